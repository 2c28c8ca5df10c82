"""GPTQ through the framework: offline quantization CLI -> our loader -> LoRA training; the
optional gptqmodel and auto_gptq paths."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from fms_acceleration.testing import build_framework
from fms_acceleration_peft import AutoGPTQAccelerationPlugin
from fms_acceleration_peft.gptq_kernels import gptqmodel_backend, own_path
from fms_acceleration_peft.gptq_linear import GPTQLinear
from fms_acceleration_peft.lora import trainable_parameter_names
from fms_acceleration_peft.quantize import main as quantize_main

GPTQ_CONFIG = {"plugins": {"peft": {"quantization": {"auto_gptq": {"kernel": "triton_v2"}}}}}
BLOCK_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)
HAS_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None


def _gptq_config(**body) -> dict:
    return {"plugins": {"peft": {"quantization": {"auto_gptq": body}}}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits 5: not supported by --quantizer fms; use one of 2, 4, 8"),
        (["--bits", "3"], "--bits 3: not supported by --quantizer fms; use one of 2, 4, 8"),
        (["--group-size", "48"], "--group-size 48: not supported"),
        (["--calibration", "/nonexistent/calib.txt"], "--calibration /nonexistent/calib.txt"),
        (["--max-length", "4"], "--max-length 4: must be at least 16"),
        (["--damp-percent", "0"], "--damp-percent 0.0: must be in (0, 1]"),
    ],
)
def test_quantize_cli_names_the_bad_flag(tiny_llama_dir, tmp_path, capsys, argv, message):
    base = ["--model", tiny_llama_dir, "--output", str(tmp_path / "q")]
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(base + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPTQMODEL, reason="checks the message shown without gptqmodel")
def test_quantize_cli_with_gptqmodel_missing(tiny_llama_dir, tmp_path, capsys):
    argv = ["--model", tiny_llama_dir, "--output", str(tmp_path / "q"), "--quantizer", "gptqmodel"]
    with pytest.raises(SystemExit):
        quantize_main(argv)
    err = capsys.readouterr().err
    assert "--quantizer gptqmodel: the package 'gptqmodel' is not installed" in err


def test_quantize_cli_checks_model_and_output(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        quantize_main(["--model", str(tmp_path), "--output", str(tmp_path / "q")])
    assert f"--model {tmp_path}: not a checkpoint directory" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(SystemExit):
        quantize_main(["--model", tiny_llama_dir, "--output", str(tmp_path / "busy")])
    assert "is not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize_main(
            ["--model", tiny_llama_dir, "--output", str(tmp_path / "q"), "--dtype", "int4"]
        )
    assert "--dtype int4" in capsys.readouterr().err


def test_kernel_choice_per_device():
    with pytest.warns(UserWarning, match="is a Triton kernel for CUDA; on cpu the torch kernel"):
        assert own_path("triton_v2", "cpu") == "auto"
    assert own_path("triton_v2", "cuda") == "auto"
    assert own_path("torch", "cuda") == "torch"
    with pytest.warns(UserWarning, match="needs CUDA"):
        assert gptqmodel_backend("gptq_triton", "cpu") == "gptq_torch"
    assert gptqmodel_backend("gptq_triton", "cuda") == "gptq_triton"
    assert gptqmodel_backend("auto_trainable", "cpu") == "gptq_torch"
    assert gptqmodel_backend("gptq_torch_fused", "cpu") == "gptq_torch_fused"
    with pytest.raises(ValueError, match="kernel='marlin'"):
        own_path("marlin", "cpu")


def test_checkpoint_is_4bit_gptq(gptq_dir):
    quant = json.loads((Path(gptq_dir) / "quantize_config.json").read_text())
    assert quant["bits"] == 4 and quant["group_size"] == 32
    assert quant["quant_method"] == "gptq" and quant["checkpoint_format"] == "gptq"
    assert quant["meta"]["quantizer"][0].startswith("fms-acceleration-peft:")
    config = json.loads((Path(gptq_dir) / "config.json").read_text())
    assert config["quantization_config"] == quant
    assert (Path(gptq_dir) / "tokenizer.json").is_file()


def test_gptq_lora_trains_through_the_framework(
    gptq_dir, all_linear_lora_config, train_args, run_trainer
):
    from peft.tuners.lora.gptq import GPTQLoraLinear

    framework = build_framework(GPTQ_CONFIG, [AutoGPTQAccelerationPlugin])
    assert framework.slot_owners == {"model_loader": "auto_gptq", "peft_wrapping": "auto_gptq"}
    with pytest.warns(UserWarning, match="on cpu the torch kernel runs"):
        model = framework.model_loader(gptq_dir)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == BLOCK_LINEARS
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # fp32 checkpoint -> bf16
    model, (peft_config,) = framework.augmentation(model, train_args(), (all_linear_lora_config,))
    assert peft_config is None
    assert all_linear_lora_config._custom_modules is None  # the caller's config is untouched
    wrapped = [m for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(wrapped) == BLOCK_LINEARS
    assert all(isinstance(m.get_base_layer(), GPTQLinear) for m in wrapped)
    names = trainable_parameter_names(model)
    assert len(names) == 2 * BLOCK_LINEARS and all("lora_" in n for n in names)
    # r=8 x (in+out) over q(64,64) k(64,32) v(64,32) o(64,64) gate/up(64,128) down(128,64)
    per_layer = 8 * (128 + 96 + 96 + 128 + 3 * 192)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer
    losses = run_trainer(model, train_args(learning_rate=1e-2, bf16=False), framework)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton path needs CUDA or TRITON_INTERPRET=1",
)
def test_triton_path_trains_like_the_torch_path(gptq_dir, lora_config):
    from peft import get_peft_model

    from fms_acceleration_peft.gptq_loading import load_gptq_model

    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    results = {}
    for path in ("torch", "triton"):
        model = load_gptq_model(gptq_dir, path, torch.float32, "cpu")
        torch.manual_seed(0)
        config = copy.deepcopy(lora_config)
        config.init_lora_weights = False  # random B: every LoRA weight gets a gradient
        config._register_custom_module({GPTQLinear: _gptq_lora_linear()})
        model = get_peft_model(model, config)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[path] = (loss.detach(), grads)
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    assert len(grads_t) == 16 and grads_t.keys() == grads_k.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-5)


def _gptq_lora_linear():
    from peft.tuners.lora.gptq import GPTQLoraLinear

    return GPTQLoraLinear


def test_sharding_view_keeps_outputs_exact(gptq_dir):
    from fms_acceleration import ModelPatcher, ModelPatcherRule, ModelPatcherTrigger
    from fms_acceleration_peft.gptq_loading import is_gptq_quant_linear, load_gptq_model
    from fms_acceleration_peft.gptq_sharding import (
        build_forward_with_original_views,
        quantized_tensors_as_parameters,
    )

    model = load_gptq_model(gptq_dir, "torch", torch.bfloat16, "cpu")
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    converted = quantized_tensors_as_parameters(model, torch.bfloat16, is_gptq_quant_linear)
    assert len(converted) == BLOCK_LINEARS
    patcher = ModelPatcher()
    targets = {id(m) for m in converted}
    patcher.register(
        ModelPatcherRule(
            "views",
            trigger=ModelPatcherTrigger(check=lambda m: id(m) in targets),
            forward_builder=build_forward_with_original_views,
        )
    )
    patcher.patch(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, GPTQLinear)
    params = dict(layer.named_parameters())
    assert {"qweight", "qzeros", "scales", "g_idx"} <= params.keys()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert "qweight" not in dict(layer.named_buffers())
    assert params["qweight"].shape == (8, 128)  # int32 [64*4/32, 64] viewed as 2 bf16 each
    assert params["scales"].shape == (2, 64)  # fp16 scales viewed as bf16: same width
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_from_quantized_false_quantizes_before_loading(tiny_llama_dir):
    config = _gptq_config(from_quantized=False, kernel="torch")
    framework = build_framework(config, [AutoGPTQAccelerationPlugin])
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("fms_gptq_*"))
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    written = model.config.quantization_config
    # hidden 64 and MLP 128: 64 is the largest preferred group dividing both
    assert written["bits"] == 4 and written["group_size"] == 64
    # the quantized copy was read and removed: nothing left in the temp folder
    assert set(scratch.glob("fms_gptq_*")) == before
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == BLOCK_LINEARS


def _fake_auto_gptq(monkeypatch, calls: list) -> type:
    """An `auto_gptq` package with the API the reference used; its from_quantized loads with
    our loader and records the keyword arguments it was given."""
    from fms_acceleration_peft.gptq_loading import load_gptq_model

    quant_linear = type(
        "QuantLinear",
        (GPTQLinear,),
        {"__module__": "auto_gptq.nn_modules.qlinear.qlinear_tritonv2"},
    )

    class BaseQuantizeConfig:
        @classmethod
        def from_pretrained(cls, path):
            config = cls()
            config.path = path
            return config

    class AutoGPTQForCausalLM:
        @staticmethod
        def from_quantized(path, **kwargs):
            calls.append((path, kwargs))
            model = load_gptq_model(path, "torch", kwargs["torch_dtype"], "cpu")
            for module in model.modules():
                if isinstance(module, GPTQLinear):
                    module.__class__ = quant_linear
            return types.SimpleNamespace(model=model)

    names = ["auto_gptq", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear"]
    names.append("auto_gptq.nn_modules.qlinear.qlinear_tritonv2")
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["auto_gptq"].AutoGPTQForCausalLM = AutoGPTQForCausalLM
    sys.modules["auto_gptq"].BaseQuantizeConfig = BaseQuantizeConfig
    sys.modules["auto_gptq.nn_modules.qlinear.qlinear_tritonv2"].QuantLinear = quant_linear
    return quant_linear


def test_use_external_lib_loads_and_adapts_through_auto_gptq(gptq_dir, lora_config, monkeypatch):
    from peft.tuners.lora.gptq import GPTQLoraLinear

    calls: list = []
    quant_linear = _fake_auto_gptq(monkeypatch, calls)
    framework = build_framework(_gptq_config(use_external_lib=True), [AutoGPTQAccelerationPlugin])
    assert framework.plugins["auto_gptq"].use_external_lib is True
    model = framework.model_loader(gptq_dir, torch_dtype=torch.float16, use_cache=False)
    ((path, kwargs),) = calls
    assert path == gptq_dir
    assert kwargs["torch_dtype"] == torch.float16 and "use_cache" not in kwargs
    assert model.config.use_cache is False  # applied to the config, as from_pretrained does
    assert kwargs["use_tritonv2"] and kwargs["trainable"] and not kwargs["use_marlin"]
    assert kwargs["disable_exllama"] and kwargs["disable_exllamav2"]
    assert kwargs["quantize_config"].path == gptq_dir
    model, _ = framework.augmentation(model, None, (lora_config,))
    wrapped = [m for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert len(wrapped) == 8  # q, k, v, o in 2 layers
    assert all(type(m.get_base_layer()) is quant_linear for m in wrapped)


@pytest.mark.skipif(not HAS_GPTQMODEL, reason="gptqmodel is not installed")
def test_gptqmodel_kernel_loads_and_trains(gptq_dir, lora_config):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    framework = build_framework(_gptq_config(kernel="gptq_torch"), [AutoGPTQAccelerationPlugin])
    with torch._dynamo.config.patch(disable=True):  # gptqmodel compiles dequantize per shape
        model = framework.model_loader(gptq_dir, dtype=torch.bfloat16)
        assert sum(isinstance(m, BaseQuantLinear) for m in model.modules()) == BLOCK_LINEARS
        model, _ = framework.augmentation(model, None, (lora_config,))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(4, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0], losses

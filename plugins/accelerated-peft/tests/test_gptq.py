"""GPTQ: offline quantization CLI -> gptqmodel load -> LoRA training through the framework."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from fms_acceleration.testing import build_framework
from fms_acceleration_peft import AutoGPTQAccelerationPlugin
from fms_acceleration_peft.gptq_kernels import backend_for
from fms_acceleration_peft.lora import trainable_parameter_names
from fms_acceleration_peft.quantize import main as quantize_main

pytest.importorskip("gptqmodel")

GPTQ_CONFIG = {"plugins": {"peft": {"quantization": {"auto_gptq": {"kernel": "triton_v2"}}}}}
BLOCK_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


@pytest.fixture(autouse=True)
def eager_dequantization():
    """gptqmodel torch.compiles each TorchLinear's dequantize; on 2 shared CPU cores inductor
    takes ~8 s per shape and recompiles between eval and train. Tests run it eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits 5: not supported; use one of 2, 3, 4, 8"),
        (["--group-size", "48"], "--group-size 48: not supported"),
        (["--calibration", "/nonexistent/calib.txt"], "--calibration /nonexistent/calib.txt"),
        (["--max-length", "4"], "--max-length 4: must be at least 16"),
    ],
)
def test_quantize_cli_names_the_bad_flag(tiny_llama_dir, tmp_path, capsys, argv, message):
    base = ["--model", tiny_llama_dir, "--output", str(tmp_path / "q")]
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(base + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


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
    with pytest.warns(UserWarning, match="needs CUDA"):
        assert backend_for("triton_v2", "cpu") == "gptq_torch"
    assert backend_for("triton_v2", "cuda") == "gptq_triton"
    assert backend_for("auto", "cpu") == "gptq_torch"
    assert backend_for("torch_fused", "cpu") == "gptq_torch_fused"
    with pytest.raises(ValueError, match="kernel='marlin'"):
        backend_for("marlin", "cpu")


def test_checkpoint_is_4bit_gptq(gptq_dir):
    quant = json.loads((Path(gptq_dir) / "quantize_config.json").read_text())
    assert quant["bits"] == 4 and quant["group_size"] == 32
    assert (Path(gptq_dir) / "tokenizer.json").is_file()


def test_gptq_lora_trains_through_the_framework(
    gptq_dir, all_linear_lora_config, train_args, run_trainer
):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    framework = build_framework(GPTQ_CONFIG, [AutoGPTQAccelerationPlugin])
    assert framework.slot_owners == {"model_loader": "auto_gptq", "peft_wrapping": "auto_gptq"}
    with pytest.warns(UserWarning, match="needs CUDA"):
        model = framework.model_loader(gptq_dir)
    assert sum(isinstance(m, BaseQuantLinear) for m in model.modules()) == BLOCK_LINEARS
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # fp32 checkpoint -> bf16
    model, (peft_config,) = framework.augmentation(model, train_args(), (all_linear_lora_config,))
    assert peft_config is None
    names = trainable_parameter_names(model)
    assert len(names) == 2 * BLOCK_LINEARS and all("lora_" in n for n in names)
    # r=8 x (in+out) over q(64,64) k(64,32) v(64,32) o(64,64) gate/up(64,128) down(128,64)
    per_layer = 8 * (128 + 96 + 96 + 128 + 3 * 192)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer
    losses = run_trainer(model, train_args(learning_rate=1e-2, bf16=False), framework)
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses


def test_sharding_view_keeps_outputs_exact(gptq_dir):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    from fms_acceleration import ModelPatcher, ModelPatcherRule, ModelPatcherTrigger
    from fms_acceleration_peft.gptq_loading import is_gptq_quant_linear, load_gptq_model
    from fms_acceleration_peft.gptq_sharding import (
        build_forward_with_original_views,
        quantized_tensors_as_parameters,
    )

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with pytest.warns(UserWarning):
        model = load_gptq_model(gptq_dir, "triton_v2", torch.bfloat16)
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    converted = quantized_tensors_as_parameters(model, torch.bfloat16, is_gptq_quant_linear)
    assert len(converted) == 14
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
    assert isinstance(layer, BaseQuantLinear)
    params = dict(layer.named_parameters())
    assert {"qweight", "qzeros", "scales", "g_idx"} <= params.keys()
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params.values())
    assert "qweight" not in dict(layer.named_buffers())
    assert params["qweight"].shape == (8, 128)  # int32 [64*4/32, 64] viewed as 2 bf16 each
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_from_quantized_false_quantizes_before_loading(tiny_llama_dir):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    config = {"plugins": {"peft": {"quantization": {"auto_gptq": {"from_quantized": False}}}}}
    framework = build_framework(config, [AutoGPTQAccelerationPlugin])
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("fms_gptq_*"))
    with pytest.warns(UserWarning, match="needs CUDA"):
        model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    written = model.config.quantization_config
    # hidden 64 and MLP 128: 64 is the largest preferred group dividing both
    assert written["bits"] == 4 and written["group_size"] == 64
    # the quantized copy was read and removed: nothing left in the temp folder
    assert set(scratch.glob("fms_gptq_*")) == before
    assert sum(isinstance(m, BaseQuantLinear) for m in model.modules()) == BLOCK_LINEARS

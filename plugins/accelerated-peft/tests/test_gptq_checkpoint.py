"""Our GPTQ loader: what it loads computes what the checkpoint means, in every layout variant the
GPTQ packages write, and a broken checkpoint is one error naming the file (and key)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration.testing import build_framework
from fms_acceleration_peft import AutoGPTQAccelerationPlugin
from fms_acceleration_peft.dtypes import resolve_dtype
from fms_acceleration_peft.gptq_format import pack_columns, unpack_columns
from fms_acceleration_peft.gptq_linear import GPTQLinear
from fms_acceleration_peft.gptq_loading import load_gptq_model

Q_PROJ = "model.layers.0.self_attn.q_proj"
IDS = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(9))


def _copy(gptq_dir: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(gptq_dir, tmp_path / "ckpt"))


def _edit_tensors(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _logits(directory, dtype=torch.float32) -> torch.Tensor:
    model = load_gptq_model(str(directory), "torch", dtype, "cpu")
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("checkpoint", ["gptq_dir", "gptq_desc_act_dir"])
def test_loaded_layers_compute_the_dequantized_float_model(checkpoint, tiny_llama_dir, request):
    from transformers import AutoModelForCausalLM

    directory = request.getfixturevalue(checkpoint)
    quantized = load_gptq_model(directory, "torch", torch.float32, "cpu")
    assert quantized.dtype == torch.float32 and not quantized.training
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, GPTQLinear)}
    assert len(layers) == 14
    q_proj = layers[Q_PROJ]
    if checkpoint == "gptq_desc_act_dir":  # 8-bit, asymmetric, groups in activation order
        assert q_proj.bits == 8 and q_proj.qweight.shape == (16, 64)
        assert not torch.equal(q_proj.g_idx, torch.sort(q_proj.g_idx).values)
        assert len(torch.unique(unpack_columns(q_proj.qzeros, 8))) > 10
    else:
        assert q_proj.bits == 4 and torch.equal(q_proj.g_idx, torch.arange(64).int() // 32)
    original = {}
    for name, layer in layers.items():
        linear = plain.get_submodule(name)
        original[name] = linear.weight.detach().clone()
        # 4-bit groups of 32 from a GPTQ run: close to the float weight, not equal
        error = (layer.dequantized_weight() - original[name]).abs()
        assert 0 < error.mean() < layer.scales.float().max()
        linear.weight.data = layer.dequantized_weight()
    for name, param in plain.named_parameters():  # norms, embeddings: as saved (bf16 values)
        if name.rsplit(".", 1)[0] not in layers:
            param.data = quantized.get_parameter(name).data.clone()
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
        got = quantized(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_checkpoint_dtype_is_read_on_both_transformers_lines(tiny_llama_dir, gptq_dir):
    assert resolve_dtype(None, tiny_llama_dir, torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", gptq_dir, torch.float16) == torch.bfloat16


def test_settings_from_config_json_alone(gptq_dir, tmp_path):
    directory = _copy(gptq_dir, tmp_path)
    (directory / "quantize_config.json").unlink()  # transformers/optimum checkpoints
    torch.testing.assert_close(_logits(directory), _logits(gptq_dir), rtol=0, atol=0)


def test_checkpoints_without_g_idx_load_in_column_order(gptq_dir, tmp_path):
    directory = _copy(gptq_dir, tmp_path)  # GPTQ-for-LLaMa era: no g_idx tensors
    _edit_tensors(directory, lambda t: [t.pop(k) for k in list(t) if k.endswith(".g_idx")])
    torch.testing.assert_close(_logits(directory), _logits(gptq_dir), rtol=0, atol=0)


def test_gptq_v2_zero_points(gptq_dir, tmp_path):
    directory = _copy(gptq_dir, tmp_path)

    def store_true_zeros(tensors):  # v2 stores the zero itself, v1 ("gptq") stores zero - 1
        for key in [k for k in tensors if k.endswith(".qzeros")]:
            tensors[key] = pack_columns(unpack_columns(tensors[key], 4) + 1, 4)

    _edit_tensors(directory, store_true_zeros)
    _edit_json(directory / "quantize_config.json", lambda d: d.update(checkpoint_format="gptq_v2"))
    torch.testing.assert_close(_logits(directory), _logits(gptq_dir), rtol=0, atol=0)


def _quant_config(edit):
    return lambda d: _edit_json(d / "quantize_config.json", edit)


def _tensors(edit):
    return lambda d: _edit_tensors(d, edit)


def _slice_qweight(tensors):
    tensors[f"{Q_PROJ}.qweight"] = tensors[f"{Q_PROJ}.qweight"][:4].contiguous()


BROKEN = {
    "truncated weights": (
        lambda d: (d / "model.safetensors").write_bytes(
            (d / "model.safetensors").read_bytes()[:99]
        ),
        "model.safetensors: cannot be read as safetensors",
    ),
    "quantize_config not JSON": (
        lambda d: (d / "quantize_config.json").write_text('{"bits": 4,'),
        "quantize_config.json: not valid JSON (line 1",
    ),
    "3 bits": (
        _quant_config(lambda q: q.update(bits=3)),
        "quantize_config.json: bits=3 is not supported; use one of 2, 4, 8",
    ),
    "group_size 0": (
        _quant_config(lambda q: q.update(group_size=0)),
        "quantize_config.json: group_size=0 must be -1 (one group) or a positive size",
    ),
    "desc_act not a bool": (
        _quant_config(lambda q: q.update(desc_act="yes")),
        "quantize_config.json: desc_act='yes' is not true or false",
    ),
    "marlin layout": (
        _quant_config(lambda q: q.update(checkpoint_format="marlin")),
        "quantize_config.json: checkpoint_format='marlin' is not readable here",
    ),
    "an AWQ checkpoint": (
        _quant_config(lambda q: q.update(quant_method="awq")),
        "quantize_config.json: quant_method='awq' is not a GPTQ checkpoint",
    ),
    "settings that do not fit the tensors": (
        _quant_config(lambda q: q.update(group_size=64)),  # the scales hold 2 groups of 32
        "model.safetensors: model.layers.0.mlp.down_proj.qzeros: shape [4, 8] does not fit a "
        "4-bit layer of 128 -> 64 with group_size 64; expected [2, 8]",
    ),
    "a cut qweight": (
        _tensors(_slice_qweight),
        f"model.safetensors: {Q_PROJ}.qweight: shape [4, 64] does not fit",
    ),
    "a missing tensor": (
        _tensors(lambda t: t.pop("model.norm.weight")),
        "the checkpoint has no tensor for model.norm.weight",
    ),
    "a stray tensor": (
        _tensors(lambda t: t.update({"model.extra.weight": torch.zeros(2)})),
        "1 tensors fit no module of the model built from config.json: model.extra.weight",
    ),
    "a quantized module that is not a linear": (
        _tensors(lambda t: t.update({"model.norm.qweight": torch.zeros(8, 64, dtype=torch.int32)})),
        "model.safetensors: model.norm: the checkpoint quantizes this module, but the model "
        "transformers builds from config.json has LlamaRMSNorm there",
    ),
    "no weight files": (
        lambda d: (d / "model.safetensors").unlink(),
        ": no weight files (*.safetensors or *.bin)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_one_error_naming_file_and_key(case, gptq_dir, tmp_path):
    damage, message = BROKEN[case]
    directory = _copy(gptq_dir, tmp_path)
    damage(directory)
    framework = build_framework(
        {"plugins": {"peft": {"quantization": {"auto_gptq": {"kernel": "torch"}}}}},
        [AutoGPTQAccelerationPlugin],
    )
    with pytest.raises(AccelerationPluginConfigError) as info:
        framework.model_loader(str(directory), dtype=torch.bfloat16)
    text = str(info.value)
    assert text.startswith("plugins.peft.quantization.auto_gptq: model_loader: "), text
    assert message in text, text
    assert str(directory) in text  # the file or folder is named in full


def test_unknown_loader_arguments_are_named(gptq_dir):
    with pytest.raises(
        ValueError, match="unexpected keyword arguments for the GPTQ loader: colour"
    ):
        load_gptq_model(gptq_dir, "torch", torch.float32, "cpu", colour="blue")
    with pytest.raises(ValueError, match="device_map must not be passed to the GPTQ loader"):
        load_gptq_model(gptq_dir, "torch", torch.float32, "cpu", device_map="auto")
    # what fms-hf-tuning passes: a config override, attn_implementation None, a cache_dir
    model = load_gptq_model(
        gptq_dir, "torch", torch.float32, "cpu", use_cache=False, attn_implementation=None,
        cache_dir=None,
    )  # fmt: skip
    assert model.config.use_cache is False

"""Every configuration error names the YAML path (or parameter), the value and what is allowed."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration.testing import build_framework
from fms_acceleration_peft import AutoGPTQAccelerationPlugin, BNBAccelerationPlugin

PLUGINS = [BNBAccelerationPlugin, AutoGPTQAccelerationPlugin]


def _bnb(**body):
    return {"plugins": {"peft": {"quantization": {"bitsandbytes": body}}}}


def _gptq(**body):
    return {"plugins": {"peft": {"quantization": {"auto_gptq": body}}}}


def _error(config, **kwargs) -> str:
    with pytest.raises(AccelerationPluginConfigError) as info:
        build_framework(config, PLUGINS, **kwargs)
    return str(info.value)


def test_bad_quant_type():
    message = _error(_bnb(quant_type="nf5"))
    assert "plugins.peft.quantization.bitsandbytes.quant_type" in message
    assert "'nf5'" in message and "nf4" in message and "fp4" in message


def test_quant_type_of_wrong_type():
    message = _error(_bnb(quant_type=4))
    assert "plugins.peft.quantization.bitsandbytes.quant_type" in message and "4" in message


def test_unknown_key_with_suggestion():
    message = _error(_bnb(quant_type="nf4", no_peft_modle=True))
    assert "plugins.peft.quantization.bitsandbytes.no_peft_modle" in message
    assert "no_peft_model" in message  # the close-match suggestion


def test_no_peft_model_must_be_bool():
    message = _error(_bnb(no_peft_model="yes"))
    assert "plugins.peft.quantization.bitsandbytes.no_peft_model" in message and "'yes'" in message


def test_bad_gptq_kernel_lists_trainable_kernels():
    message = _error(_gptq(kernel="marlin"))
    assert "plugins.peft.quantization.auto_gptq.kernel" in message and "'marlin'" in message
    assert "triton_v2" in message and "torch" in message


def test_unknown_gptq_key():
    message = _error(_gptq(kernal="triton_v2"))
    assert "plugins.peft.quantization.auto_gptq.kernal" in message and "kernel" in message


def test_use_external_lib_true_is_refused():
    message = _error(_gptq(use_external_lib=True))
    assert "plugins.peft.quantization.auto_gptq.use_external_lib" in message
    assert "auto_gptq" in message and "false" in message


def test_both_quantizations_conflict_on_model_loader():
    config = {
        "plugins": {"peft": {"quantization": {"bitsandbytes": {}, "auto_gptq": {}}}},
    }
    message = _error(config)
    assert "bitsandbytes" in message and "auto_gptq" in message and "model_loader" in message


def test_missing_gptqmodel_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name)
    )
    message = _error(_gptq())
    assert "'auto_gptq'" in message and "'gptqmodel'" in message
    assert "pip install fms-acceleration-peft[gptq]" in message


def test_missing_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name),
    )
    message = _error(_bnb())
    assert "'bitsandbytes'" in message and "pip install bitsandbytes" in message


def test_augmentation_without_a_lora_config(tiny_llama_dir):
    framework = build_framework(_bnb(), PLUGINS)
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    with pytest.raises(AccelerationPluginConfigError, match=re.escape("modifiable_args[0]")) as e:
        framework.augmentation(model, None, (None,))
    assert "plugins.peft.quantization.bitsandbytes" in str(e.value)
    assert "no_peft_model: true" in str(e.value)


def test_loader_rejects_a_non_float_dtype(tiny_llama_dir):
    framework = build_framework(_bnb(), PLUGINS)
    with pytest.raises(AccelerationPluginConfigError, match="dtype='int8'"):
        framework.model_loader(tiny_llama_dir, dtype="int8")


def test_gptq_loader_rejects_float32(tiny_llama_dir):
    framework = build_framework(_gptq(), PLUGINS)
    with pytest.raises(AccelerationPluginConfigError, match="bfloat16 or float16") as e:
        framework.model_loader(tiny_llama_dir, dtype=torch.float32)
    assert "plugins.peft.quantization.auto_gptq" in str(e.value)

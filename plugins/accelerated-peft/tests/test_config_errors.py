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


def test_use_external_lib_without_auto_gptq_names_key_and_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "auto_gptq" else real(name)
    )
    with pytest.raises(AssertionError) as info:  # the reference raised an AssertionError
        build_framework(_gptq(use_external_lib=True), PLUGINS)
    assert isinstance(info.value, AccelerationPluginConfigError)
    message = str(info.value)
    assert (
        "plugins.peft.quantization.auto_gptq.use_external_lib: true needs the package " in message
    )
    assert "'auto_gptq'" in message and "set it to false" in message
    assert "Unable to use external library, auto_gptq module not found." in message


def test_use_external_lib_takes_only_the_triton_v2_kernel():
    message = _error(_gptq(use_external_lib=True, kernel="torch"))
    assert "plugins.peft.quantization.auto_gptq.use_external_lib: true" in message
    assert "plugins.peft.quantization.auto_gptq.kernel is 'torch'" in message


def test_both_quantizations_conflict_on_model_loader():
    config = {
        "plugins": {"peft": {"quantization": {"bitsandbytes": {}, "auto_gptq": {}}}},
    }
    message = _error(config)
    assert "bitsandbytes" in message and "auto_gptq" in message and "model_loader" in message


def test_gptq_needs_no_gptq_package_by_default(monkeypatch):
    real = importlib.util.find_spec
    absent = {"gptqmodel", "auto_gptq"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name)
    )
    framework = build_framework(_gptq(), PLUGINS)
    assert framework.plugins["auto_gptq"].kernel == "triton_v2"
    assert framework.plugins["auto_gptq"].use_external_lib is False


def test_gptqmodel_kernel_without_gptqmodel_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name)
    )
    message = _error(_gptq(kernel="gptq_torch"))
    assert "plugins.peft.quantization.auto_gptq.kernel: 'gptq_torch' is a gptqmodel kernel" in (
        message
    )
    assert "'gptqmodel'" in message and "fms-acceleration-peft[gptq]" in message
    assert "triton_v2 or torch" in message


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
    # the reference raised an AssertionError with this phrase; fms-hf-tuning's tests match it
    assert isinstance(e.value, AssertionError)
    assert "need peft_config to install PEFT adapters" in str(e.value)


def test_loader_rejects_a_non_float_dtype(tiny_llama_dir):
    framework = build_framework(_bnb(), PLUGINS)
    with pytest.raises(AccelerationPluginConfigError, match="dtype='int8'"):
        framework.model_loader(tiny_llama_dir, dtype="int8")


def test_gptq_loader_refuses_an_unquantized_checkpoint(tiny_llama_dir):
    framework = build_framework(_gptq(kernel="torch"), PLUGINS)
    with pytest.raises(AccelerationPluginConfigError) as e:
        framework.model_loader(tiny_llama_dir, dtype=torch.float32)
    message = str(e.value)
    assert message.startswith("plugins.peft.quantization.auto_gptq: model_loader: ")
    assert "config.json: no quantization_config" in message and "not a GPTQ checkpoint" in message


def test_gptqmodel_kernels_refuse_float32(gptq_dir):
    pytest.importorskip("gptqmodel")
    framework = build_framework(_gptq(kernel="gptq_torch"), PLUGINS)
    with pytest.raises(AccelerationPluginConfigError, match="use bfloat16 or float16") as e:
        framework.model_loader(gptq_dir, dtype=torch.float32)
    assert "plugins.peft.quantization.auto_gptq: model_loader: dtype=torch.float32" in str(e.value)

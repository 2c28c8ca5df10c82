"""The configurations fms-hf-tuning writes, built the way it builds them: a temporary YAML from
its acceleration dataclasses, `AccelerationFramework.active_plugins = []` set on the class first,
and the empty configuration expected to raise "No plugins could be configured"."""

from __future__ import annotations

import importlib.util
import tempfile
import warnings

import pytest
import yaml

from fms_acceleration import AccelerationFramework

BNB = {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4", "no_peft_model": False}}}}
GPTQ = {"peft": {"quantization": {"auto_gptq": {"kernel": "triton_v2", "from_quantized": True}}}}
FUSED_LORA = {"base_layer": "bitsandbytes", "fused_lora": True}
FAST_KERNELS = {"fast_loss": True, "fast_rms_layernorm": True, "fast_rope_embeddings": True}
PADDING_FREE = {"attention": {"padding_free": {"method": "huggingface"}}}
MULTIPACK = {"dataloader": {"multipack": {"num_processes": 16}}}


def _merge(*trees: dict) -> dict:
    out: dict = {}
    for tree in trees:
        node_stack = [(out, tree)]
        while node_stack:
            target, source = node_stack.pop()
            for key, value in source.items():
                if isinstance(value, dict):
                    node_stack.append((target.setdefault(key, {}), value))
                else:
                    target[key] = value
    return out


CASES = {
    "bnb qlora": ([BNB], ["BNBAccelerationPlugin"], ["fms_acceleration_peft"]),
    "gptq lora": ([GPTQ], ["AutoGPTQAccelerationPlugin"], ["fms_acceleration_peft"]),
    "bnb qlora + fused ops": (
        [
            BNB,
            {"peft": {"quantization": {"fused_ops_and_kernels": FUSED_LORA}}},
            {"training": {"fused_ops_and_kernels": FAST_KERNELS}},
        ],
        ["BNBAccelerationPlugin", "FastKernelsAccelerationPlugin"],
        ["fms_acceleration_peft", "fms_acceleration_foak"],
    ),
    "fast kernels": (
        [{"training": {"fused_ops_and_kernels": FAST_KERNELS}}],
        ["FastKernelsAccelerationPlugin"],
        ["fms_acceleration_foak"],
    ),
    "padding free + multipack": (
        [{"training": PADDING_FREE}, {"training": MULTIPACK}],
        ["PaddingFreeAccelerationPlugin", "MultipackDataloaderAccelerationPlugin"],
        ["fms_acceleration_aadp"],
    ),
}


def _framework_as_the_client_builds_it(contents: dict) -> AccelerationFramework | None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        yaml.dump({"plugins": contents}, handle)
        handle.flush()
        saved = {k: AccelerationFramework.__dict__.get(k) for k in ("active_plugins",)}
        try:
            AccelerationFramework.active_plugins = []
            AccelerationFramework.plugins_require_custom_loading = []
            try:
                return AccelerationFramework(handle.name)
            except ValueError as err:
                (message,) = err.args
                if not contents and message.startswith("No plugins could be configured"):
                    return None
                raise
        finally:
            for name in ("active_plugins", "plugins_require_custom_loading"):
                if name in AccelerationFramework.__dict__:
                    delattr(AccelerationFramework, name)
            assert all(v is None for v in saved.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_client_combinations_build(case):
    trees, expected, modules = CASES[case]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        framework = _framework_as_the_client_builds_it(_merge(*trees))
    assert [name for name, _ in framework.active_plugins] == expected


def test_empty_client_configuration_is_the_reference_error():
    assert _framework_as_the_client_builds_it({}) is None

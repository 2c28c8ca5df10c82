"""Configuration, compatibility declarations and architecture checks of the plugin."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError, StanzaModel
from fms_acceleration.framework_plugin import isolated_registrations
from fms_acceleration.testing import build_framework, tiny_model_config
from fms_acceleration_foak import FastKernelsAccelerationPlugin

PEFT = "peft.quantization.fused_ops_and_kernels"


def _config(body: dict, path: str = "training.fused_ops_and_kernels", extra=None) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = body
    for key, value in (extra or {}).items():
        tree.setdefault("peft", {}).setdefault("quantization", {})[key] = value
    return {"plugins": tree}


class _FakeLoader(AccelerationPlugin):
    """Stands in for an accelerated-peft loader: takes the model_loader slot."""

    @property
    def requires_custom_loading(self) -> bool:
        return True


class FakeBnb(_FakeLoader):
    pass


class FakeGptq(_FakeLoader):
    pass


class BnbOptions(StanzaModel):
    quant_type: str = "nf4"


class GptqOptions(StanzaModel):
    kernel: str = "triton_v2"


with isolated_registrations():  # visible to build_framework only, never to other tests
    AccelerationPlugin.register_plugin(
        FakeBnb,
        configuration_and_paths=["peft.quantization.bitsandbytes"],
        plugin_id="bitsandbytes",
        schemas={"peft.quantization.bitsandbytes": BnbOptions},
    )
    AccelerationPlugin.register_plugin(
        FakeGptq,
        configuration_and_paths=["peft.quantization.auto_gptq"],
        plugin_id="auto_gptq",
        schemas={"peft.quantization.auto_gptq": GptqOptions},
    )


def test_defaults_and_slots(foak_classes):
    framework = build_framework(_config({}), foak_classes)
    plugin = framework.plugins["fused_ops_and_kernels"]
    assert plugin.options == {
        "base_layer": "auto_gptq",
        "fused_lora": False,
        "fast_loss": True,
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": True,
        "fast_swiglu": True,
    }
    assert plugin.taken_slots() == {"loss", "rms_norm", "rope", "swiglu"}
    assert framework.slot_owners == {
        "loss": "fused_ops_and_kernels",
        "rms_norm": "fused_ops_and_kernels",
        "rope": "fused_ops_and_kernels",
        "swiglu": "fused_ops_and_kernels",
    }


def test_slots_follow_switches(foak_classes):
    body = {
        "fast_loss": False,
        "fast_rms_layernorm": True,
        "fast_rope_embeddings": False,
        "fast_swiglu": False,
    }
    plugin = build_framework(_config(body), foak_classes).plugins["fused_ops_and_kernels"]
    assert plugin.taken_slots() == {"rms_norm"}


def test_misspelled_key_is_refused_by_name(foak_classes):
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(_config({"fast_rsm_layernorm": True}), foak_classes)
    message = str(err.value)
    assert "plugins.training.fused_ops_and_kernels.fast_rsm_layernorm" in message
    assert "did you mean 'fast_rms_layernorm'" in message


@pytest.mark.parametrize(
    "body, expected",
    [
        ({"fast_loss": "fused_ce_ligr"}, "did you mean 'fused_ce_liger'"),
        ({"fast_loss": 1}, "fast_loss"),
        ({"base_layer": "gptq"}, "allowed: 'auto_gptq', 'bitsandbytes'"),
        ({"fast_rope_embeddings": "yes"}, "expected a boolean"),
        # null is not "left out": the reference reads it as false, our default is true
        (
            {"fast_loss": None},
            "plugins.training.fused_ops_and_kernels.fast_loss: null is not an allowed value; "
            "allowed: true, false, 'fused_ce_liger'.",
        ),
        (
            {"fast_rms_layernorm": None},
            "plugins.training.fused_ops_and_kernels.fast_rms_layernorm: expected a boolean "
            "(true/false), got NoneType null.",
        ),
    ],
)
def test_bad_values_are_refused(foak_classes, body, expected):
    with pytest.raises(AccelerationPluginConfigError, match="fused_ops_and_kernels") as err:
        build_framework(_config(body), foak_classes)
    assert expected in str(err.value)


def test_null_base_layer_takes_its_default(foak_classes):
    # fms-hf-tuning's FusedLoraConfig defaults base_layer to None, which its YAML writes as null
    body = {"base_layer": None, "fused_lora": False, "fast_loss": False}
    plugin = build_framework(_config(body, PEFT), foak_classes).plugins["fused_ops_and_kernels"]
    assert (plugin.options["base_layer"], plugin.options["fast_loss"]) == ("auto_gptq", False)


def test_legacy_fused_linear_loss(foak_classes):
    body = {"fast_loss": False, "fused_linear_loss": True}
    plugin = build_framework(_config(body), foak_classes).plugins["fused_ops_and_kernels"]
    assert plugin.options["fast_loss"] == "fused_ce_liger"
    with pytest.raises(AccelerationPluginConfigError, match="conflicts with fast_loss: true"):
        build_framework(_config({"fast_loss": True, "fused_linear_loss": True}), foak_classes)


def test_both_stanzas_combine_into_one_activation(foak_classes):
    # what fms-hf-tuning writes for QLoRA + fused ops: fused LoRA under peft.quantization.,
    # the kernel switches under training.
    kernels = {"fast_loss": True, "fast_rms_layernorm": False, "fast_rope_embeddings": True}
    fused = {"base_layer": "bitsandbytes", "fused_lora": True}
    config = _config(kernels, extra={"fused_ops_and_kernels": fused, "bitsandbytes": {}})
    framework = build_framework(config, [*foak_classes, FakeBnb])
    assert [name for name, _ in framework.active_plugins] == [
        "FakeBnb",
        "FastKernelsAccelerationPlugin",
    ]
    assert framework.plugins["fused_ops_and_kernels"].options == {
        "base_layer": "bitsandbytes",
        "fused_lora": True,
        "fast_loss": True,
        "fast_rms_layernorm": False,
        "fast_rope_embeddings": True,
        "fast_swiglu": True,
    }
    # a switch turned on in either stanza is on
    either = _config(
        {"fast_rms_layernorm": False},
        extra={"fused_ops_and_kernels": {"fast_rms_layernorm": True, "fused_lora": False}},
    )
    options = build_framework(either, foak_classes).plugins["fused_ops_and_kernels"].options
    assert options["fast_rms_layernorm"] is True and options["fused_lora"] is False
    # a value given differently in both is refused with both paths
    clash = _config(
        {"fast_loss": "fused_ce_liger"},
        extra={"fused_ops_and_kernels": {"fast_loss": True, "fused_lora": False}},
    )
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(clash, foak_classes)
    assert (
        "plugins.training.fused_ops_and_kernels.fast_loss: 'fused_ce_liger' conflicts with "
        "plugins.peft.quantization.fused_ops_and_kernels.fast_loss: True" in str(err.value)
    )


def test_fused_lora_requires_matching_peft_loader(foak_classes):
    plugins = [*foak_classes, FakeBnb, FakeGptq]
    body = {"base_layer": "bitsandbytes", "fused_lora": True}
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(_config(body, PEFT), plugins)
    assert "slot 'model_loader'" in str(err.value) and "bitsandbytes" in str(err.value)

    gptq_loaded = _config(body, PEFT, extra={"auto_gptq": {}})
    with pytest.raises(AccelerationPluginConfigError, match="taken by 'auto_gptq'"):
        build_framework(gptq_loaded, plugins)

    framework = build_framework(_config(body, PEFT, extra={"bitsandbytes": {}}), plugins)
    assert framework.slot_owners["lora_forward"] == "fused_ops_and_kernels"
    assert framework.slot_owners["model_loader"] == "bitsandbytes"


def test_peft_stanza_defaults_to_fused_lora(foak_classes):
    # fms-acceleration's fast_quantized_peft.yaml: fused_lora is on unless turned off
    with pytest.raises(AccelerationPluginConfigError, match="auto_gptq"):
        build_framework(_config({"base_layer": "auto_gptq"}, PEFT), foak_classes)


def test_quantized_model_requires_mixed_precision(foak_classes):
    model = AutoModelForCausalLM.from_config(tiny_model_config("llama"))
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    framework = build_framework(_config({}), foak_classes)
    with pytest.raises(AccelerationPluginConfigError, match="set fp16=True or bf16=True"):
        framework.augmentation(model, SimpleNamespace(fp16=False, bf16=False), ())
    framework.augmentation(model, SimpleNamespace(fp16=False, bf16=True), ())
    framework.undo_patches()


def test_unsupported_architecture_named(foak_classes):
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    framework = build_framework(_config({}), foak_classes)
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework.augmentation(model, SimpleNamespace(fp16=False, bf16=False), ())
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message
    assert "Qwen3ForCausalLM" in message


def test_arch_table_rejects_a_supported_model_type_with_another_head():
    from fms_acceleration_foak.models import arch_spec_for

    config = tiny_model_config("llama", num_labels=3)
    model = LlamaForSequenceClassification(config)
    with pytest.raises(AccelerationPluginConfigError, match="LlamaForSequenceClassification"):
        arch_spec_for(model)


def test_found_through_entry_point_discovery():
    from fms_acceleration import AccelerationFramework

    framework = AccelerationFramework(_config({"fast_loss": "fused_ce_liger"}))
    plugin = framework.plugins["fused_ops_and_kernels"]
    assert type(plugin).__name__ == FastKernelsAccelerationPlugin.__name__
    assert plugin.options["fast_loss"] == "fused_ce_liger"


@pytest.mark.parametrize("name", ["fast_kernels", "fast_quantized_peft"])
def test_sample_configs_validate(name, foak_classes):
    import yaml

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    framework = build_framework(yaml.safe_load(path.read_text()), [*foak_classes, FakeBnb])
    plugin = framework.plugins["fused_ops_and_kernels"]
    assert plugin.taken_slots() >= {"loss", "rms_norm", "rope"}
    assert plugin.options["fused_lora"] is (name == "fast_quantized_peft")

"""The reference fms-acceleration's public surface, as its plugins and clients use it: module
names, class-level patcher calls, schema-less registration, test helpers. Our own tests, written
from the reference's documented behaviour."""

from __future__ import annotations

import pytest
import torch

from fms_acceleration import (
    AccelerationPluginConfigError,
    NoPluginsConfiguredError,
    PatchError,
)
from fms_acceleration.accelerator_patcher import (
    AcceleratorPatcher,
    AcceleratorPatcherComponent,
    AcceleratorRuleReplace,
)
from fms_acceleration.constants import (
    ACCELERATION_FRAMEWORK_ENV_KEY,
    KEY_PLUGINS,
    PLUGIN_PREFIX,
    PLUGINS,
)
from fms_acceleration.errors import PluginCombinationError, PluginRegistrationError
from fms_acceleration.framework import KEY_PLUGINS as FRAMEWORK_KEY_PLUGINS
from fms_acceleration.framework import AccelerationFramework
from fms_acceleration.framework_plugin import (
    PLUGIN_REGISTRATIONS,
    AccelerationPlugin,
    PluginRegistration,
    registration_of,
)
from fms_acceleration.model_patcher import (
    ModelPatcher,
    ModelPatcherRule,
    ModelPatcherTrigger,
    ModelPatcherTriggerType,
    combine_functions,
    combine_triggers,
)
from fms_acceleration.utils.test_utils import (
    build_framework_and_maybe_instantiate,
    configure_framework_from_json,
    create_noop_model_with_archs,
    create_plugin_cls,
    dummy_augmentation,
    dummy_custom_loader,
    instantiate_accel_patcher,
    instantiate_framework,
    instantiate_model_patcher,
    read_configuration,
    update_configuration_contents,
)


def test_constants_and_module_names():
    assert KEY_PLUGINS == FRAMEWORK_KEY_PLUGINS == "plugins"
    assert PLUGIN_PREFIX == "fms_acceleration_"
    assert ACCELERATION_FRAMEWORK_ENV_KEY == "ACCELERATION_FRAMEWORK_CONFIG_FILE"
    assert {"peft", "foak", "aadp", "moe", "odm"} <= set(PLUGINS)


def test_configuration_helpers(tmp_path):
    contents = {"peft": {"quantization": {"auto_gptq": {"kernel": "triton_v2"}}}}
    # a mapping at the path: its key is renamed; a scalar: replaced
    update_configuration_contents(contents, "peft.quantization.auto_gptq", "bitsandbytes")
    assert contents == {"peft": {"quantization": {"bitsandbytes": {"kernel": "triton_v2"}}}}
    update_configuration_contents(contents, "peft.quantization.bitsandbytes.kernel", "x")
    assert contents["peft"]["quantization"]["bitsandbytes"] == {"kernel": "x"}
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  training:\n    x: {a: 1}\n")
    assert read_configuration(str(path)) == {"plugins": {"training": {"x": {"a": 1}}}}


def test_registration_scopes_and_the_live_view():
    plugin = create_plugin_cls(requires_augmentation=True, augmentation=dummy_augmentation)
    outside = len(PLUGIN_REGISTRATIONS)
    with build_framework_and_maybe_instantiate(
        [(["training.a"], plugin)], {"training": {"a": {"k": 1}}}
    ) as framework:
        assert len(PLUGIN_REGISTRATIONS) == 1  # only what this block registered
        registration = PLUGIN_REGISTRATIONS[0]
        assert isinstance(registration, PluginRegistration)
        assert (registration.plugin, registration.AND, registration.OR) == (
            plugin,
            ["training.a"],
            [],
        )
        assert [name for name, _ in framework.active_plugins] == ["PluginNoop"]
        assert framework.plugins_require_custom_loading == []
    assert len(PLUGIN_REGISTRATIONS) == outside
    with build_framework_and_maybe_instantiate(
        [([], ["training.b", "training.c"], plugin)], instantiate=False
    ) as nothing:
        assert nothing is None
        assert PLUGIN_REGISTRATIONS[0].OR == ["training.b", "training.c"]
        with pytest.raises(NoPluginsConfiguredError, match="No plugins could be configured"):
            configure_framework_from_json({"training": {"d": {}}})
        with instantiate_framework({"training": {"c": {"x": 1}}}) as framework:
            assert len(framework.active_plugins) == 1


def test_noop_models_and_plugin_classes():
    model = create_noop_model_with_archs(archs=["CausalLM"])
    assert issubclass(model, torch.nn.Module) and model.config.architectures == ["CausalLM"]
    loader = create_plugin_cls(
        class_name="Loader",
        restricted_models={"CausalLM"},
        requires_custom_loading=True,
        requires_augmentation=True,
        augmentation=dummy_augmentation,
        model_loader=dummy_custom_loader,
    )
    assert loader.requires_custom_loading is True
    with build_framework_and_maybe_instantiate(
        [(["peft.quantization.loader"], loader)], {"peft": {"quantization": {"loader": {}}}}
    ) as framework:
        assert framework.requires_custom_loading
        assert framework.model_loader("x").config.architectures == ["DummyModel"]
        with pytest.raises(ValueError, match="Model architectures in"):
            framework.augmentation(create_noop_model_with_archs(archs=["CNN"]), None, None)


def test_patcher_classes_and_helpers():
    trigger = ModelPatcherTrigger(check=lambda m: hasattr(m, "weight"))
    assert trigger.type is ModelPatcherTriggerType.callable
    assert ModelPatcherTrigger(check=torch.nn.Linear).type is ModelPatcherTriggerType.module
    both = combine_triggers(ModelPatcherTrigger(check=torch.nn.Linear), trigger, logic="AND")
    assert both.is_triggered(torch.nn.Linear(2, 2)) and not both.is_triggered(torch.nn.ReLU())
    appended = combine_functions(lambda m: [1], lambda m: [2, 3])
    assert appended(None) == [1, 2, 3]
    with pytest.raises(AssertionError, match="either replacement or replacement_builder"):
        AcceleratorRuleReplace("r", AcceleratorPatcherComponent.data_loader)
    with pytest.raises(AssertionError, match="Invalid special behavior kwargs"):
        AcceleratorRuleReplace(
            "r", AcceleratorPatcherComponent.data_loader, replacement=1, kwargs={"nope": 1}
        )
    with instantiate_accel_patcher():
        AcceleratorPatcher.replace(
            "r", AcceleratorPatcherComponent.data_collator, replacement=lambda rows: rows
        )
        assert list(AcceleratorPatcher.replacement_rules) == [2]
        with pytest.raises(AssertionError, match="replace has already been called once"):
            AcceleratorPatcher.replace(
                "s", AcceleratorPatcherComponent.data_collator, replacement=len
            )
    assert AcceleratorPatcher.replacement_rules == {}


class ReferenceStylePlugin(AccelerationPlugin):
    """Written as for the reference: no schema, class-level patcher calls, one-argument init."""

    def __init__(self, configurations):
        super().__init__(configurations)
        self.scale = self._check_config_and_maybe_check_values(
            "training.reference_style.scale", values=[1.0, 2.0], default=1.0
        )
        self.collated = 0

    @property
    def requires_augmentation(self):
        return True

    def augmentation(self, model, train_args, modifiable_args):
        def scaled_norm(self, hidden_states):
            self.calls = getattr(self, "calls", 0) + 1
            return type(self).forward(self, hidden_states)

        ModelPatcher.register(
            ModelPatcherRule(
                rule_id="reference-style-norm",
                trigger=ModelPatcherTrigger(check=lambda m: type(m).__name__ == "LlamaRMSNorm"),
                forward=scaled_norm,
            )
        )

        def count(collate_fn):
            def collate(rows):
                self.collated += 1
                return collate_fn(rows)

            return collate

        AcceleratorPatcher.replace(
            "reference-style-collator",
            AcceleratorPatcherComponent.data_collator,
            replacement_builder=count,
        )
        return model, modifiable_args


def test_reference_style_plugin_runs_through_a_real_trainer(tmp_path, tiny_llama_dir, caplog):
    import logging

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    from fms_acceleration.testing import tiny_dataset

    AccelerationPlugin.register_plugin(
        ReferenceStylePlugin, configuration_and_paths=["training.reference_style"]
    )
    path = tmp_path / "accel.yaml"
    path.write_text("plugins:\n  training:\n    reference_style:\n      scale: 2.0\n")
    with pytest.warns(UserWarning, match="'ReferenceStylePlugin'.*declares no schema"):
        framework = AccelerationFramework(str(path))
    other = AccelerationFramework(str(path))
    plugin = framework.plugins["ReferenceStylePlugin"]
    assert plugin.scale == 2.0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    hub_kernels = bool(getattr(model, "use_kernels", False))  # transformers 5.2x + kernels
    model, _ = framework.augmentation(model, args, (None,))
    assert framework.model_patcher.counts() == {"reference-style-norm": 5}
    # patching hub-decorated norms turns hub kernels off, else train() would drop the patch
    assert [r.rule_id for r in framework.model_patcher.history if r.kind == "setting"] == (
        ["hub-kernels-off"] if hub_kernels else []
    )
    assert other.model_patcher.rules == {}  # the other framework saw nothing
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(n=12, seq_len=8),
        data_collator=default_data_collator,
    )
    with caplog.at_level(logging.INFO, logger="fms_acceleration"):
        framework.get_callbacks_and_ready_for_train(model, trainer.accelerator, trainer=trainer)
    assert "Active Plugin: ReferenceStylePlugin." in caplog.text
    trainer.train()
    assert trainer.state.global_step == 3 and plugin.collated >= 3
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert [m.calls for m in norms] == [3] * 5
    framework.undo_patches()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert bool(getattr(model, "use_kernels", False)) == hub_kernels
    assert "prepare" not in trainer.accelerator.__dict__
    # outside a running framework, class-level writes are refused with the way out named
    with pytest.raises(PatchError, match="outside a running framework"):
        ModelPatcher.register(framework.model_patcher.rules["reference-style-norm"])
    with instantiate_model_patcher() as patcher:
        ModelPatcher.register(framework.model_patcher.rules["reference-style-norm"])
    assert list(patcher.rules) == ["reference-style-norm"]


def test_a_spy_of_a_loader_meets_a_requirement_on_that_loader(fakes):
    """fms-hf-tuning's foak test spies on AutoGPTQ beside fused_lora, which requires the
    auto_gptq loader: the spy (registered under its own name) stands in for its parent."""
    spy = type("LoaderSpy", (fakes.FakeLoader,), {})
    AccelerationPlugin.register_plugin(
        spy, configuration_and_paths=["peft.quantization.fake_loader"]
    )
    config = {
        "plugins": {
            "peft": {"quantization": {"fake_loader": {}}},
            "training": {"fake_kernels": {"fused_lora": True}},
        }
    }
    framework = AccelerationFramework(config, plugin_classes=[spy, fakes.FakeKernels])
    assert [name for name, _ in framework.active_plugins] == ["LoaderSpy", "FakeKernels"]
    assert framework.plugins["LoaderSpy"].is_one_of(["fake_loader"])
    assert not framework.plugins["fake_kernels"].is_one_of(["fake_loader", "other_loader"])
    # a loader that does not extend it still leaves the requirement unmet, named
    plain = type("PlainLoader", (AccelerationPlugin,), {"requires_custom_loading": True})
    AccelerationPlugin.register_plugin(plain, configuration_and_paths=["peft.quantization.plain"])
    config["plugins"]["peft"]["quantization"] = {"plain": {}}
    with pytest.raises(PluginCombinationError, match="is taken by 'PlainLoader'"):
        AccelerationFramework(config, plugin_classes=[plain, fakes.FakeKernels])


def test_a_schema_less_subclass_keeps_its_parents_validation_and_defaults(fakes):
    """fms-hf-tuning's tests register spies (subclasses made with type()) without schemas; the
    parent's code reads its defaults, so the stanza must still be validated and filled."""
    spy = type("LoaderSpy", (fakes.FakeLoader,), {})
    registration = AccelerationPlugin.register_plugin(
        spy, configuration_and_paths=["peft.quantization.fake_loader"]
    )
    parent = registration_of(fakes.FakeLoader)
    assert registration.validated and registration.package_name == parent.package_name
    config = {"plugins": {"peft": {"quantization": {"fake_loader": {}}}}}
    framework = AccelerationFramework(config, plugin_classes=[spy])  # no "no schema" warning
    stanza = framework.plugins["LoaderSpy"].stanza("peft.quantization.fake_loader")
    assert stanza == {"quant_type": "nf4", "no_peft_model": False}
    config["plugins"]["peft"]["quantization"]["fake_loader"] = {"quant_typ": "fp4"}
    with pytest.raises(
        AccelerationPluginConfigError, match="unknown key 'quant_typ' \\(did you mean 'quant_type'"
    ):
        AccelerationFramework(config, plugin_classes=[spy])


def test_a_framework_kept_from_an_earlier_block_reports_the_newest_block():
    """The reference's `active_plugins` was a class-level list each block refilled; its own tests
    (accelerated-peft's test_configure_bnb_plugin) read a framework from a closed block to see
    the plugins of the next one. Frameworks built directly never share state."""
    augmenting = create_plugin_cls(
        class_name="Augmenting", requires_augmentation=True, augmentation=dummy_augmentation
    )
    plain = create_plugin_cls(class_name="Plain")
    AccelerationPlugin.register_plugin(augmenting, configuration_and_paths=["training.a"])
    AccelerationPlugin.register_plugin(plain, configuration_and_paths=["training.b"])
    with instantiate_framework({"training": {"a": {}}}) as first:
        assert first.requires_augmentation and len(first.active_plugins) == 1
    with instantiate_framework({"training": {"b": {}}}) as second:
        assert not second.requires_augmentation
        assert not first.requires_augmentation  # the reference's view: the newest block
        assert [name for name, _ in first.active_plugins] == ["Plain"]
    # no block open: each reports its own plugins again
    assert first.requires_augmentation and not second.requires_augmentation
    direct = AccelerationFramework({"plugins": {"training": {"a": {}}}})
    with instantiate_framework({"training": {"b": {}}}):
        assert direct.requires_augmentation
        assert [name for name, _ in direct.active_plugins] == ["Augmenting"]


def test_the_block_helper_records_a_non_plugin_as_the_reference_did_but_builds_nothing_on_it():
    """fms-hf-tuning's test registers a config object to reach its own `--fused_lora` check:
    the reference recorded it; a framework over it is still refused, naming it."""
    config = {"fused_lora": True}
    with build_framework_and_maybe_instantiate(
        [(["training.fused_ops_and_kernels"], config)], instantiate=False
    ) as nothing:
        assert nothing is None
    with (
        pytest.raises(PluginRegistrationError) as info,
        build_framework_and_maybe_instantiate(
            [(["training.fused_ops_and_kernels"], config)], {"training": {}}
        ),
    ):
        pass
    assert "{'fused_lora': True} at ['training.fused_ops_and_kernels']" in str(info.value)

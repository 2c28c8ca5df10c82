"""Activation (AND/OR), declared order, the plugin table, independence, discovery."""

from __future__ import annotations

import warnings

import pytest
import torch

from fms_acceleration import (
    AccelerationFramework,
    AccelerationFrameworkError,
    AccelerationPlugin,
    AccelerationPluginConfigError,
    ModelPatcherRule,
    ModelPatcherTrigger,
    NoPluginsConfiguredError,
    StanzaModel,
)
from fms_acceleration.discovery import discover_plugins, plugin_catalogue
from fms_acceleration.errors import ModelWithoutConfigError, PluginHookMissingError
from fms_acceleration.framework_plugin import PLUGIN_REGISTRATIONS, registration_of
from fms_acceleration.testing import build_framework


class Empty(StanzaModel):
    pass


def _config(**stanzas):
    plugins: dict = {}
    for dotted, body in stanzas.items():
        node = plugins
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = body
    return {"plugins": plugins}


def test_and_paths_need_every_stanza(fakes):
    with pytest.raises(NoPluginsConfiguredError, match="no plugin has all the stanzas"):
        build_framework(_config(training__part_a={}), fakes.ALL)
    both = build_framework(_config(training__part_a={}, training__part_b={}), fakes.ALL)
    assert list(both.plugins) == ["and_plugin"]
    assert both.active_plugins == [("AndPlugin", both.plugins["and_plugin"])]


def test_stanza_of_an_inactive_plugin_beside_active_ones_is_refused(fakes):
    # part_a alone leaves and_plugin inactive; with another plugin active it would be ignored
    config = _config(training__part_a={}, training__fake_kernels={})
    with pytest.raises(AccelerationPluginConfigError) as info:
        build_framework(config, fakes.ALL)
    assert str(info.value).endswith(
        "plugins.training.part_a: plugin 'and_plugin' needs plugins.training.part_b as well; "
        "without it this stanza would be ignored. Add it, or remove plugins.training.part_a."
    )


@pytest.mark.parametrize("path", ["training__fake_kernels", "peft__quantization__fake_kernels"])
def test_or_paths_need_any_stanza(fakes, path):
    framework = build_framework(_config(**{path: {"fast_loss": "fused_ce_liger"}}), fakes.ALL)
    plugin = framework.plugins["fake_kernels"]
    assert isinstance(plugin, fakes.FakeKernels)
    dotted = path.replace("__", ".")
    assert plugin.stanza(dotted) == {
        "fast_rms_layernorm": False,
        "fast_loss": "fused_ce_liger",
        "fused_lora": False,
        "chunk_size": 1024,
    }
    # a plugin receives only the sections of its own stanza paths
    assert list(plugin.configurations) == [dotted.split(".")[0]]
    assert plugin._check_config_and_maybe_check_values(f"{dotted}.fast_loss") == "fused_ce_liger"


def test_loaders_run_first_then_declared_order(fakes):
    config = _config(
        peft__quantization__fake_loader={},
        training__fake_kernels={},
        training__part_a={},
        training__part_b={},
    )
    framework = build_framework(config, fakes.ALL)
    # FakeLoader declares order=50 (> FakeKernels' 10) but takes model_loader, so it leads;
    # AndPlugin declares no order (100).
    assert list(framework.plugins) == ["fake_loader", "fake_kernels", "and_plugin"]
    assert framework.plugins_require_custom_loading == ["FakeLoader"]
    assert framework.requires_custom_loading
    assert not framework.requires_augmentation
    assert dict(framework.slot_owners) == {"model_loader": "fake_loader", "loss": "fake_kernels"}
    with pytest.raises(TypeError):
        framework.plugins["x"] = None  # the table is read-only


def test_plugins_without_declared_order_run_in_registration_order():
    made = []
    for name in ("Zeta", "Alpha", "Mid"):
        cls = type(name, (AccelerationPlugin,), {})
        AccelerationPlugin.register_plugin(
            cls,
            configuration_and_paths=[f"training.{name.lower()}"],
            schemas={f"training.{name.lower()}": Empty},
        )
        made.append(cls)
    framework = build_framework(
        _config(training__zeta={}, training__alpha={}, training__mid={}), made
    )
    assert [name for name, _ in framework.active_plugins] == ["Zeta", "Alpha", "Mid"]


def test_class_level_assignment_does_not_change_instances(fakes):
    framework = build_framework(_config(peft__quantization__fake_loader={}), fakes.ALL)
    saved = AccelerationFramework.__dict__.get("active_plugins")
    try:
        # what fms-hf-tuning does before building its framework
        AccelerationFramework.active_plugins = []
        AccelerationFramework.plugins_require_custom_loading = []
        assert [n for n, _ in framework.active_plugins] == ["FakeLoader"]
        assert framework.plugins_require_custom_loading == ["FakeLoader"]
        later = build_framework(_config(training__other_loss={}), fakes.ALL)
        assert [n for n, _ in later.active_plugins] == ["OtherLoss"]
        assert [n for n, _ in framework.active_plugins] == ["FakeLoader"]
    finally:
        for name in ("active_plugins", "plugins_require_custom_loading"):
            if name in AccelerationFramework.__dict__:
                delattr(AccelerationFramework, name)
        assert saved is None


def test_duplicate_plugin_ids_are_refused(fakes):
    class Twin(AccelerationPlugin):
        pass

    AccelerationPlugin.register_plugin(
        Twin,
        configuration_and_paths=["training.other_loss"],
        plugin_id="fake_kernels",
        schemas={"training.other_loss": Empty},
    )
    with pytest.raises(AccelerationPluginConfigError, match="two active plugins share the id"):
        build_framework(
            _config(training__fake_kernels={}, training__other_loss={}),
            [fakes.FakeKernels, Twin],
        )


def test_conflicting_schemas_for_one_path_are_refused(fakes):
    class Clash(AccelerationPlugin):
        pass

    class OtherScale(StanzaModel):
        scale: int = 1

    AccelerationPlugin.register_plugin(
        Clash,
        configuration_and_paths=["training.other_loss"],
        plugin_id="clash",
        schemas={"training.other_loss": OtherScale},
    )
    with pytest.raises(AccelerationPluginConfigError, match="declare different schemas"):
        build_framework(_config(training__other_loss={}), [fakes.OtherLoss, Clash])


def test_two_frameworks_in_one_process_stay_independent(fakes, tiny_llama_dir):
    first = build_framework(
        _config(peft__quantization__fake_loader={"quant_type": "fp4"}), fakes.ALL
    )
    second = build_framework(_config(training__fake_kernels={"chunk_size": 7}), fakes.ALL)
    assert list(first.plugins) == ["fake_loader"]
    assert list(second.plugins) == ["fake_kernels"]
    assert first.configurations != second.configurations
    assert first.model_patcher is not second.model_patcher
    assert first.plugins["fake_loader"].model_patcher is first.model_patcher
    model = first.model_loader(str(tiny_llama_dir))
    first.model_patcher.register(
        ModelPatcherRule(
            "double-norm",
            trigger=ModelPatcherTrigger(check=lambda m: type(m).__name__ == "LlamaRMSNorm"),
            forward=lambda self, x: 2 * x,
        )
    )
    first.model_patcher.patch(model)
    assert first.model_patcher.counts() == {"double-norm": 5}
    assert second.model_patcher.history == []
    assert "double-norm" not in second.summary()
    # a third framework sees neither's registrations or patches
    third = build_framework(_config(training__fake_kernels={}), fakes.ALL)
    assert third.plugins["fake_kernels"].stanza("training.fake_kernels")["chunk_size"] == 1024


def test_model_loader_without_loader_plugin_is_a_clear_error(fakes):
    framework = build_framework(_config(training__fake_kernels={}), fakes.ALL)
    with pytest.raises(PluginHookMissingError, match="none of activated plugins") as info:
        framework.model_loader("anything")
    assert isinstance(info.value, (AccelerationFrameworkError, NotImplementedError))
    assert "AutoModelForCausalLM.from_pretrained" in str(info.value)


def test_restricted_archs_checked_only_where_they_matter(fakes, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    framework = build_framework(_config(training__restricted={}), fakes.ALL)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(AccelerationPluginConfigError) as info:
        framework.augmentation(model, None, modifiable_args=(None,))
    assert str(info.value) == (
        "Model architectures in ['LlamaForCausalLM'] are not supported for 'restricted'; "
        "supported: MistralForCausalLM."
    )

    class RestrictedNoAugment(AccelerationPlugin):
        restricted_model_archs = frozenset({"MistralForCausalLM"})

    AccelerationPlugin.register_plugin(
        RestrictedNoAugment,
        configuration_and_paths=["training.part_a"],
        plugin_id="restricted_no_augment",
        schemas={"training.part_a": Empty},
    )
    quiet = build_framework(_config(training__part_a={}), [RestrictedNoAugment])
    same_model, args = quiet.augmentation(model, None, modifiable_args=(None,))
    assert same_model is model and args == (None,)


def test_augmentation_contract(fakes, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    class Broken(AccelerationPlugin):
        @property
        def requires_augmentation(self):
            return True

        def augmentation(self, model, train_args, modifiable_args):
            return model, ()

    class Incomplete(AccelerationPlugin):
        requires_augmentation = True

    AccelerationPlugin.register_plugin(
        Broken, configuration_and_paths=["training.part_a"], schemas={"training.part_a": Empty}
    )
    AccelerationPlugin.register_plugin(
        Incomplete, configuration_and_paths=["training.part_b"], schemas={"training.part_b": Empty}
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    framework = build_framework(_config(training__part_a={}), [Broken])
    with pytest.raises(AccelerationFrameworkError, match="expected a tuple of 1 item"):
        framework.augmentation(model, None, modifiable_args=(None,))
    with pytest.raises(AccelerationFrameworkError, match="must be a tuple, got list"):
        framework.augmentation(model, None, modifiable_args=[None])
    with pytest.raises(ModelWithoutConfigError, match="needs a transformers model") as info:
        framework.augmentation(torch.nn.Linear(2, 2), None, modifiable_args=(None,))
    assert isinstance(info.value, AttributeError)
    incomplete = build_framework(_config(training__part_b={}), [Incomplete])
    with pytest.raises(PluginHookMissingError, match="does not define augmentation"):
        incomplete.augmentation(model, None, None)


def test_registration_rules():
    class NoSchema(AccelerationPlugin):
        pass

    with pytest.raises(TypeError, match="must be a list of dotted paths"):
        AccelerationPlugin.register_plugin(NoSchema, configuration_and_paths="training.x")
    with pytest.raises(TypeError, match="at least one stanza path"):
        AccelerationPlugin.register_plugin(NoSchema)
    with pytest.raises(AssertionError, match="Specify at least one AND or OR path"):
        AccelerationPlugin.register_plugin(NoSchema, configuration_and_paths=[])
    with pytest.raises(TypeError, match="schema given for 'training.y'"):
        AccelerationPlugin.register_plugin(
            NoSchema, configuration_and_paths=["training.x"], schemas={"training.y": Empty}
        )
    with pytest.raises(TypeError, match="must be a pydantic model class"):
        AccelerationPlugin.register_plugin(
            NoSchema, configuration_and_paths=["training.x"], schemas={"training.x": dict}
        )
    # no schema: the reference's style, allowed
    registration = AccelerationPlugin.register_plugin(
        NoSchema, configuration_and_paths=["training.x"]
    )
    assert not registration.validated
    assert registration.plugin is NoSchema and registration.AND == ["training.x"]
    assert registration.OR == []

    class Parent(AccelerationPlugin):
        pass

    AccelerationPlugin.register_plugin(
        Parent, configuration_and_paths=["training.x"], schemas={"training.x": Empty}
    )

    class Child(Parent):
        pass

    assert registration_of(Parent).plugin_id == "Parent"
    assert registration_of(Child) is None  # registrations are not inherited
    with pytest.raises(TypeError, match="never passed to AccelerationPlugin.register_plugin"):
        build_framework({"plugins": {"training": {"x": {}}}}, [Child])


def test_in_process_registration_is_found_beside_entry_points(installed_fakes):
    class Local(AccelerationPlugin):
        def __init__(self, configurations):
            super().__init__(configurations)
            self.seen = configurations

    before = len(PLUGIN_REGISTRATIONS)
    AccelerationPlugin.register_plugin(Local, configuration_and_paths=["training.local"])
    assert len(PLUGIN_REGISTRATIONS) == before + 1
    assert PLUGIN_REGISTRATIONS[-1].plugin is Local
    with pytest.raises(AttributeError):
        PLUGIN_REGISTRATIONS.append(None)  # read-only view
    with pytest.warns(
        UserWarning,
        match="'Local' .* declares no schema: its stanzas "
        "plugins.training.local reach it unvalidated",
    ):
        framework = AccelerationFramework(
            {"plugins": {"training": {"local": {"anything": [1, 2]}, "other_loss": {}}}}
        )
    assert [name for name, _ in framework.active_plugins] == ["OtherLoss", "Local"]
    local = framework.plugins["Local"]
    assert local.seen == {"training": {"local": {"anything": [1, 2]}}}


def test_empty_configuration_raises_the_reference_message(installed_fakes, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("plugins: {}\n")
    with pytest.raises(ValueError) as info:
        AccelerationFramework(str(path))
    (message,) = info.value.args
    assert message.startswith(
        "No plugins could be configured. Please check the acceleration framework configuration "
        f"file '{path}'"
    )
    assert isinstance(info.value, NoPluginsConfiguredError)
    assert isinstance(info.value, AccelerationPluginConfigError)


def test_plugin_whose_init_raises_is_named(installed_fakes):
    class Fragile(AccelerationPlugin):
        def __init__(self, configurations):
            super().__init__(configurations)
            configurations["training"]["fragile"]["missing"]

    AccelerationPlugin.register_plugin(Fragile, configuration_and_paths=["training.fragile"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AccelerationPluginConfigError) as info:
            AccelerationFramework({"plugins": {"training": {"fragile": {"x": 1}}}})
    assert "plugin 'Fragile' (Fragile from package" in str(info.value)
    assert "failed to start: KeyError: 'missing'" in str(info.value)


def test_env_var_fallback(tmp_path, monkeypatch, installed_fakes):
    path = tmp_path / "accel.yaml"
    path.write_text("plugins:\n  training:\n    other_loss:\n      scale: 2\n")
    monkeypatch.setenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", str(path))
    with pytest.warns(UserWarning, match="plugin 'broken'"):
        framework = AccelerationFramework()
    stanza = framework.plugins["other_loss"].stanza("training.other_loss")
    assert stanza == {"scale": 2.0, "labels": ["loss"], "tag": "x"}


def test_discovery_reports_broken_plugin_naming_it(installed_fakes):
    with pytest.warns(UserWarning) as record:
        found = discover_plugins()
    messages = [str(w.message) for w in record]
    assert any(
        "plugin 'broken' (no_such_module_xyz)" in m and "failed to import" in m for m in messages
    )
    assert sorted(p.plugin_id for p in found) == [
        "and_plugin",
        "fake_kernels",
        "fake_loader",
        "needs_missing",
        "other_loader",
        "other_loss",
        "restricted",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        broken = plugin_catalogue().broken
    assert [b.name for b in broken] == ["broken"]
    assert broken[0].problem.startswith(
        "failed to import: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )


def test_require_packages_check_can_be_disabled(fakes):
    framework = build_framework(
        _config(training__needs_missing={}), fakes.ALL, require_packages_check=False
    )
    assert list(framework.plugins) == ["needs_missing"]


def test_a_second_plugin_class_of_the_same_name_is_left_out_with_a_warning(installed_fakes):
    first = type("Twin", (AccelerationPlugin,), {})
    second = type("Twin", (AccelerationPlugin,), {})
    AccelerationPlugin.register_plugin(first, configuration_and_paths=["training.twin_a"])
    AccelerationPlugin.register_plugin(second, configuration_and_paths=["training.twin_b"])
    config = {"plugins": {"training": {"twin_a": {"x": 1}, "twin_b": {"x": 2}}}}
    with pytest.warns(UserWarning, match="plugin class Twin from .* is not activated"):
        framework = AccelerationFramework(config)
    assert [(name, type(p)) for name, p in framework.active_plugins] == [("Twin", first)]

"""Activation (AND/OR), declared order, the plugin table, independence, discovery."""

from __future__ import annotations

import pytest
import torch

from fms_acceleration import (
    AccelerationFramework,
    AccelerationFrameworkError,
    AccelerationPlugin,
    AccelerationPluginConfigError,
    ModelPatcherRule,
    ModelPatcherTrigger,
    Option,
    Stanza,
)
from fms_acceleration.discovery import discover_plugins
from fms_acceleration.plugin import registration_of
from fms_acceleration.testing import build_framework


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
    only_a = build_framework(_config(training__part_a={}), fakes.ALL)
    assert only_a.active_plugins == []
    both = build_framework(_config(training__part_a={}, training__part_b={}), fakes.ALL)
    assert [pid for pid, _ in both.active_plugins] == ["and_plugin"]


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
    assert plugin._check_config_and_maybe_check_values(f"{dotted}.fast_loss") == "fused_ce_liger"


def test_loaders_run_first_then_declared_order(fakes):
    config = _config(
        peft__quantization__fake_loader={},
        training__fake_kernels={},
        training__part_a={},
        training__part_b={},
    )
    framework = build_framework(config, fakes.ALL)
    # FakeLoader declares order=50 (> FakeKernels' 10) but takes model_loader, so it leads.
    assert [pid for pid, _ in framework.active_plugins] == [
        "fake_loader",
        "fake_kernels",
        "and_plugin",
    ]
    assert framework.requires_custom_loading
    assert not framework.requires_augmentation
    assert dict(framework.slot_owners) == {"model_loader": "fake_loader", "loss": "fake_kernels"}
    assert set(framework.plugins) == {"fake_loader", "fake_kernels", "and_plugin"}
    with pytest.raises(TypeError):
        framework.plugins["x"] = None  # the table is read-only


def test_duplicate_plugin_ids_are_refused(fakes):
    class Twin(AccelerationPlugin):
        pass

    AccelerationPlugin.register_plugin(
        Twin,
        configuration_and_paths=["training.other_loss"],
        plugin_id="fake_kernels",
        schemas={"training.other_loss": Stanza(scale=Option(float, default=1.0))},
    )
    with pytest.raises(AccelerationPluginConfigError, match="two active plugins share the id"):
        build_framework(
            _config(training__fake_kernels={}, training__other_loss={}),
            [fakes.FakeKernels, Twin],
        )


def test_conflicting_schemas_for_one_path_are_refused(fakes):
    class Clash(AccelerationPlugin):
        pass

    AccelerationPlugin.register_plugin(
        Clash,
        configuration_and_paths=["training.other_loss"],
        plugin_id="clash",
        schemas={"training.other_loss": Stanza(scale=Option(int, default=1))},
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
    with pytest.raises(AccelerationFrameworkError, match="no active plugin loads models"):
        framework.model_loader("anything")


def test_restricted_archs_checked_only_where_they_matter(fakes, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    framework = build_framework(_config(training__restricted={}), fakes.ALL)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(AccelerationPluginConfigError) as info:
        framework.augmentation(model, None, modifiable_args=(None,))
    assert str(info.value) == (
        "plugin 'restricted' does not support the model architecture LlamaForCausalLM; "
        "supported: MistralForCausalLM."
    )

    class RestrictedNoAugment(AccelerationPlugin):
        restricted_model_archs = frozenset({"MistralForCausalLM"})

    AccelerationPlugin.register_plugin(
        RestrictedNoAugment,
        configuration_and_paths=["training.part_a"],
        plugin_id="restricted_no_augment",
        schemas={"training.part_a": Stanza()},
    )
    quiet = build_framework(_config(training__part_a={}), [RestrictedNoAugment])
    same_model, args = quiet.augmentation(model, None, modifiable_args=(None,))
    assert same_model is model and args == (None,)


def test_augmentation_must_return_same_length_tuple(fakes, tiny_llama_dir):
    class Broken(AccelerationPlugin):
        @property
        def requires_augmentation(self):
            return True

        def augmentation(self, model, train_args, modifiable_args):
            return model, ()

    AccelerationPlugin.register_plugin(
        Broken,
        configuration_and_paths=["training.part_a"],
        plugin_id="broken",
        schemas={"training.part_a": Stanza()},
    )
    framework = build_framework(_config(training__part_a={}), [Broken])
    with pytest.raises(AccelerationFrameworkError, match="expected a tuple of 1 item"):
        framework.augmentation(torch.nn.Linear(2, 2), None, modifiable_args=(None,))
    with pytest.raises(AccelerationFrameworkError, match="must be a tuple, got list"):
        framework.augmentation(torch.nn.Linear(2, 2), None, modifiable_args=[None])


def test_registration_rules():
    class NoSchema(AccelerationPlugin):
        pass

    with pytest.raises(TypeError, match="no schema declared for stanza path"):
        AccelerationPlugin.register_plugin(NoSchema, configuration_and_paths=["training.x"])
    with pytest.raises(TypeError, match="must be a list of dotted paths"):
        AccelerationPlugin.register_plugin(
            NoSchema, configuration_and_paths="training.x", schemas={"training.x": Stanza()}
        )
    with pytest.raises(TypeError, match="at least one stanza path"):
        AccelerationPlugin.register_plugin(NoSchema)

    class Parent(AccelerationPlugin):
        pass

    AccelerationPlugin.register_plugin(
        Parent, configuration_and_paths=["training.x"], schemas={"training.x": Stanza()}
    )

    class Child(Parent):
        pass

    assert registration_of(Parent).plugin_id == "Parent"
    assert registration_of(Child) is None  # registrations are not inherited
    with pytest.raises(TypeError, match="never passed to AccelerationPlugin.register_plugin"):
        build_framework({"plugins": {"training": {"x": {}}}}, [Child])


def test_env_var_fallback(tmp_path, monkeypatch, installed_fakes):
    path = tmp_path / "accel.yaml"
    path.write_text("plugins:\n  training:\n    other_loss:\n      scale: 2\n")
    monkeypatch.setenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", str(path))
    with pytest.warns(UserWarning, match="plugin 'broken'"):
        framework = AccelerationFramework()
    assert framework.plugins["other_loss"].stanza("training.other_loss") == {"scale": 2.0}


def test_discovery_skips_broken_plugin_with_warning_naming_it(installed_fakes):
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


def test_require_packages_check_can_be_disabled(fakes):
    framework = build_framework(
        _config(training__needs_missing={}), fakes.ALL, require_packages_check=False
    )
    assert list(framework.plugins) == ["needs_missing"]

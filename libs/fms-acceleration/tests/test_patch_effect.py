"""A patch that does not take effect is never silent: forwards that transformers 5.2x's kernels
hub would reset are protected, a patch the library routes around stops the run with the patch,
the module and the versions named (or, with `strict: false`, warns and shows in the summary)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    AcceleratorPatcherComponent,
    ModelPatcherRule,
    ModelPatcherTrigger,
    PatchNotInEffectError,
)
from fms_acceleration.compat import dtype_kwargs, transformers_version
from fms_acceleration.testing import build_framework

NORMS = 5  # a tiny Llama: 2 layers x 2 norms + the final norm


class CountNorms(AccelerationPlugin):
    """Counts calls into a forward it puts on every LlamaRMSNorm."""

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model, train_args, modifiable_args):
        plugin = self
        plugin.calls = 0

        def build(module):
            def forward(self, hidden_states):
                plugin.calls += 1
                return type(self).forward(self, hidden_states)

            return forward

        self.model_patcher.register(
            ModelPatcherRule(
                rule_id="count-norms",
                trigger=ModelPatcherTrigger(check=lambda m: type(m).__name__ == "LlamaRMSNorm"),
                forward_builder=build,
            )
        )
        return model, modifiable_args


class SwapsModuleFunction(AccelerationPlugin):
    """Replaces `<module>.rotate` (the test names the module) with a counting wrapper."""

    module_name = ""

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model, train_args, modifiable_args):
        original = sys.modules[self.module_name].rotate
        self.model_patcher.register(
            ModelPatcherRule(
                rule_id="swap-rotate",
                import_and_maybe_reload=(f"{self.module_name}.rotate", lambda x: original(x), None),
                applies_to_any_model=True,
            )
        )
        return model, modifiable_args


class ReplacesCollator(AccelerationPlugin):
    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model, train_args, modifiable_args):
        self.accelerator_patcher.replace(
            "wrap-collator",
            AcceleratorPatcherComponent.data_collator,
            replacement_builder=lambda collate: collate,
        )
        return model, modifiable_args


def _framework(cls, stanza: str, strict: bool | None = None):
    AccelerationPlugin.register_plugin(cls, configuration_and_paths=[f"training.{stanza}"])
    config = {"plugins": {"training": {stanza: {"on": True}}}}
    if strict is not None:
        config["strict"] = strict
    with pytest.warns(UserWarning, match="declares no schema"):
        return build_framework(config, [cls])


def _load(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, **dtype_kwargs(torch.float32))


def _forward(model) -> None:
    model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)


def test_forwards_on_hub_decorated_layers_survive_train_eval_switches(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    hub_kernels = bool(getattr(model, "use_kernels", False))  # transformers 5.2x + kernels
    framework = _framework(CountNorms, "count_norms")
    model, _ = framework.augmentation(model, None, (None,))
    plugin = framework.plugins["CountNorms"]
    for switch in (model.train, model.eval, model.train):
        switch()  # 5.2x re-kernelizes here unless hub kernels were turned off
        plugin.calls = 0
        _forward(model)
        assert plugin.calls == NORMS
    framework.get_callbacks_and_ready_for_train(model)  # checks: no error
    assert framework.model_patcher.counts() == {"count-norms": NORMS}
    settings = [r.rule_id for r in framework.model_patcher.history if r.kind == "setting"]
    assert settings == (["hub-kernels-off"] if hub_kernels else [])
    assert not getattr(model, "use_kernels", False)
    framework.undo_patches()
    assert bool(getattr(model, "use_kernels", False)) == hub_kernels
    assert all("forward" not in vars(m) for m in model.modules())


def _routed_around(model, how: str) -> None:
    """What a transformers release may do to a forward set on an instance."""
    if how == "kernelize":
        if not hasattr(type(model.model.norm), "kernel_layer_name"):
            pytest.skip("this transformers has no kernels-hub decorators (needs 5.2x + kernels)")
        model.set_use_kernels(True)  # re-kernelizing resets every decorated layer's forward
    else:
        del model.model.norm.forward


@pytest.mark.parametrize("how", ["kernelize", "replaced"])
def test_a_forward_routed_around_stops_the_run_with_the_patch_named(tiny_llama_dir, how):
    model = _load(tiny_llama_dir)
    framework = _framework(CountNorms, "count_norms")
    model, _ = framework.augmentation(model, None, (None,))
    framework.get_callbacks_and_ready_for_train(model)
    _routed_around(model, how)
    with pytest.raises(PatchNotInEffectError) as info:
        framework.check_patches(trained=True)
    message = str(info.value)
    assert "patch 'count-norms' on model.norm (LlamaRMSNorm): its forward was replaced" in message
    assert f"transformers {transformers_version()}" in message
    assert "Training would run without it" in message and "'strict: false'" in message
    framework.undo_patches()


def test_accelerates_mixed_precision_wrapper_keeps_a_root_forward_in_effect(tiny_llama_dir):
    """Full fine-tuning in mixed precision: accelerate wraps the model's own forward (where a
    loss patch sits) in autocast and convert_outputs_to_fp32; both call ours, so it holds."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    class CountRoot(CountNorms):
        def augmentation(self, model, train_args, modifiable_args):
            plugin = self
            plugin.calls = 0

            def build(module):
                def forward(self, *args, **kwargs):
                    plugin.calls += 1
                    return type(self).forward(self, *args, **kwargs)

                return forward

            self.model_patcher.register(
                ModelPatcherRule(
                    rule_id="count-root",
                    trigger=ModelPatcherTrigger(check=lambda m: m is model),
                    forward_builder=build,
                )
            )
            return model, modifiable_args

    model = _load(tiny_llama_dir)
    framework = _framework(CountRoot, "count_root")
    model, _ = framework.augmentation(model, None, (None,))
    framework.get_callbacks_and_ready_for_train(model)
    # the accelerator's state is process-wide: this test and later ones choose their precision
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        wrapped = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "convert_outputs_to_fp32" in wrapped.forward.__qualname__
    _forward(wrapped)
    assert framework.plugins["CountRoot"].calls == 1
    framework.check_patches(trained=True)  # no PatchNotInEffectError
    # a forward replaced outright is still caught
    model.forward = types.MethodType(type(model).forward, model)
    with pytest.raises(PatchNotInEffectError, match="patch 'count-root' on <root>"):
        framework.check_patches(trained=True)
    framework.undo_patches()


def test_strict_false_warns_once_and_the_summary_says_not_applied(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    framework = _framework(CountNorms, "count_norms", strict=False)
    model, _ = framework.augmentation(model, None, (None,))
    framework.get_callbacks_and_ready_for_train(model)
    _routed_around(model, "replaced")
    with pytest.warns(UserWarning, match="not applied \\(strict: false\\): patch 'count-norms'"):
        framework.check_patches(trained=True)
    framework.check_patches(trained=True)  # already reported: no second warning
    not_applied = [line for line in framework.summary().splitlines() if "not applied" in line]
    assert not_applied == [
        "not applied: patch 'count-norms' on model.norm (LlamaRMSNorm): its forward was "
        "replaced after patching (now the class's own)"
    ]
    framework.undo_patches()


def _fake_modeling(name: str, calls_by_name: bool) -> types.ModuleType:
    """A modeling module whose attention calls `rotate` by its global name, or (as a release
    might) through an attribute, so that replacing the module's `rotate` changes nothing."""
    source = (
        "import torch\n"
        "def rotate(x):\n    return -x\n"
        "class Attention(torch.nn.Module):\n"
        "    rotary_fn = staticmethod(rotate)\n"
        "    def forward(self, x):\n"
        f"        return {'rotate(x)' if calls_by_name else 'self.rotary_fn(x)'}\n"
    )
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, name, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("calls_by_name", [True, False])
def test_a_module_function_nothing_calls_by_name_is_named(calls_by_name, tmp_path):
    name = f"fake_modeling_{'global' if calls_by_name else 'attribute'}"
    module = _fake_modeling(name, calls_by_name)
    SwapsModuleFunction.module_name = name
    framework = _framework(SwapsModuleFunction, "swaps")
    model = torch.nn.Sequential(module.Attention())
    model.config = types.SimpleNamespace(architectures=["Fake"])
    model, _ = framework.augmentation(model, None, (None,))
    assert module.rotate is not module.Attention.rotary_fn  # the swap itself happened
    try:
        if calls_by_name:
            framework.get_callbacks_and_ready_for_train(model)
            x = torch.randn(3)
            torch.testing.assert_close(model(x), -x)
        else:
            with pytest.raises(PatchNotInEffectError) as info:
                framework.get_callbacks_and_ready_for_train(model)
            assert (
                f"patch 'swap-rotate' on {name}.rotate: no function or class of {name} calls "
                "'rotate' by name, so the replacement is never called"
            ) in str(info.value)
    finally:
        framework.undo_patches()
        del sys.modules[name]


def test_a_collator_replacement_no_dataloader_went_through_is_named():
    framework = _framework(ReplacesCollator, "collator")
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(architectures=["Linear"])
    framework.augmentation(model, None, (None,))
    framework.get_callbacks_and_ready_for_train(model)  # no accelerator: nothing prepared
    framework.check_patches()  # before any step, nothing is expected yet
    with pytest.raises(PatchNotInEffectError) as info:
        framework.check_patches(trained=True)
    assert (
        "patch 'wrap-collator' on data_collator: no DataLoader went through "
        "accelerator.prepare, so it was never replaced"
    ) in str(info.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"strict": "no", "plugins": {"training": {"x": {}}}},
            "<dict configuration>: 'strict: 'no'' must be true or false",
        ),
        (
            {"stirct": False, "plugins": {"training": {"x": {}}}},
            "<dict configuration>: unknown top-level key 'stirct' (did you mean 'strict'?); "
            "the top-level keys are 'plugins' and 'strict'.",
        ),
    ],
)
def test_the_strict_option_is_checked(document, message):
    from fms_acceleration import AccelerationFramework

    with pytest.raises(AccelerationPluginConfigError) as info:
        AccelerationFramework(document)
    assert str(info.value).startswith(message)

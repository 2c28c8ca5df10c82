"""ModelPatcher, AcceleratorPatcher, TrainerPatcher: triggers, builders, attribute swaps,
method rules, class-level routing, history and undo."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types

import pytest
import torch
from torch.utils.data import DataLoader

from fms_acceleration import (
    AccelerationFramework,
    AccelerationPlugin,
    AcceleratorPatcher,
    AcceleratorPatcherComponent,
    ModelPatcher,
    ModelPatcherRule,
    ModelPatcherTrigger,
    PatchError,
    TrainerPatcher,
)
from fms_acceleration.model_patcher import combine_triggers, patch_model
from fms_acceleration.utils.test_utils import instantiate_accel_patcher, instantiate_model_patcher


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _model():
    return torch.nn.Sequential(
        Scale(2.0), torch.nn.Sequential(Scale(3.0), torch.nn.ReLU()), Scale(5.0)
    )


def test_forward_rule_by_class_changes_output_and_undo_restores_it():
    torch.manual_seed(1)
    model, x = _model(), torch.randn(7, 3)
    before = model(x)
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule("halve", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: v)
    )
    records = patcher.patch(model)
    assert [r.target for r in records] == ["0 (Scale)", "1.0 (Scale)", "2 (Scale)"]
    assert patcher.counts() == {"halve": 3}
    torch.testing.assert_close(model(x), torch.relu(x))
    # the reference's summary groups by rule, module (last name) and class
    assert patcher.summary().splitlines()[1:] == [
        "Rule: halve           Module: 0                         Class: Scale           Num:  2",
        "Rule: halve           Module: 2                         Class: Scale           Num:  1",
    ]
    patcher.undo()
    torch.testing.assert_close(model(x), before)
    assert patcher.history == []
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_builders_get_the_module_as_self_and_their_named_kwargs():
    torch.manual_seed(2)
    model, x = _model(), torch.randn(4, 5)
    patcher = ModelPatcher()

    def builder(module, offset):
        def forward(self, v):
            return v * (self.factor + offset)

        return forward

    patcher.register(
        ModelPatcherRule(
            "nested-only",
            trigger=ModelPatcherTrigger(lambda m: isinstance(m, Scale), module_name="1.0"),
            forward_builder=builder,
            forward_builder_args=["offset"],
        )
    )
    patcher.patch(model, offset=1.0, ignored="not passed")
    assert patcher.counts() == {"nested-only": 1}
    torch.testing.assert_close(model(x), 5.0 * torch.relu(2.0 * x * 4.0))
    # applying again does nothing: a rule is applied once
    assert patcher.patch(model) == []


def test_module_name_matches_exactly():
    model = torch.nn.Module()
    for name in ("submodule_1", "submodule_10"):
        model.add_module(name, Scale(1.0))
    trigger = ModelPatcherTrigger(check=Scale, module_name="submodule_1")
    hits = [name for name, module in model.named_modules() if trigger.is_triggered(module, name)]
    assert hits == ["submodule_1"]


def test_builder_returning_trigger_forward_pairs_patches_the_subtree():
    model = _model()
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            "inner",
            trigger=ModelPatcherTrigger(
                lambda m: isinstance(m, torch.nn.Sequential) and len(m) == 2
            ),
            forward_builder=lambda module: [
                (ModelPatcherTrigger(Scale), lambda self, v: v + 100.0),
                (ModelPatcherTrigger(torch.nn.ReLU), lambda self, v: v - 1.0),
            ],
        )
    )
    patcher.patch(model)
    assert sorted((r.rule_id, r.module_name) for r in patcher.history) == [
        ("inner-1", "0"),
        ("inner-2", "1"),
    ]
    x = torch.full((1, 2), 1.0)
    # outer Scale(2) -> 2; inner Scale patched (+100) -> 102; ReLU patched (-1) -> 101; * 5
    torch.testing.assert_close(model(x), torch.full((1, 2), 505.0))


def test_first_rule_wins_on_a_module_with_a_warning():
    model = _model()
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule("a", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: v)
    )
    patcher.register(
        ModelPatcherRule("b", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: -v)
    )
    with pytest.warns(UserWarning, match="rule b is ignored on 0 as an earlier rule a"):
        patcher.patch(model)
    assert patcher.counts() == {"a": 3}


def test_rule_validation_and_duplicate_ids():
    incomplete = ModelPatcherRule("bad", forward=lambda s, v: v)  # built, as in the reference
    with pytest.raises(PatchError, match="needs a trigger"):
        ModelPatcher().register(incomplete)
    with pytest.raises(PatchError, match="at most one of forward, forward builder"):
        ModelPatcherRule("bad", forward=lambda s: s, forward_builder=lambda m: m)
    with pytest.raises(PatchError, match="trigger must be None"):
        ModelPatcherRule(
            "bad", trigger=ModelPatcherTrigger(Scale), import_and_maybe_reload=("a.b", 1, None)
        )
    with pytest.raises(PatchError, match="forward_builder_args but no forward_builder"):
        ModelPatcherRule(
            "bad", trigger=ModelPatcherTrigger(Scale), forward=len, forward_builder_args=[]
        )
    with pytest.raises(PatchError, match="would undo the patch"):
        ModelPatcherRule("bad", import_and_maybe_reload=("pkg.mod.attr", 1, "pkg.mod"))
    with pytest.raises(TypeError, match="check argument needs to be torch.nn.Module or Callable"):
        ModelPatcherTrigger(check=3)
    with pytest.raises(PatchError, match="Only `AND`, `OR` logic"):
        combine_triggers(ModelPatcherTrigger(Scale), logic="XOR")
    patcher = ModelPatcher()
    rule = ModelPatcherRule("r", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: v)
    patcher.register(rule)
    with pytest.raises(PatchError, match="patch rule 'r' already exists") as info:
        patcher.register(rule)
    assert isinstance(info.value, AssertionError)  # what the reference raised


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """fms_pkg_a defines f, g and TABLE; fms_pkg_b imports them by name (so needs a reload to
    see a swap); fms_pkg_b.sub too."""
    (tmp_path / "fms_pkg_a.py").write_text(
        textwrap.dedent(
            """
            def f(x):
                return x + 1

            def g(x):
                return x + 2

            TABLE = {"loss": "plain"}
            """
        )
    )
    (tmp_path / "fms_pkg_b").mkdir()
    (tmp_path / "fms_pkg_b" / "__init__.py").write_text(
        "from fms_pkg_a import f, g\n\ndef h(x):\n    return f(x) * 10 + g(x)\n"
    )
    (tmp_path / "fms_pkg_b" / "sub.py").write_text("from fms_pkg_a import f\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("fms_pkg_a", "fms_pkg_b", "fms_pkg_b.sub"):
        sys.modules.pop(name, None)


def test_import_rules_reload_once_per_module_and_undo(modules):
    a = importlib.import_module("fms_pkg_a")
    b = importlib.import_module("fms_pkg_b")
    assert b.h(1) == 23
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            "swap-f", import_and_maybe_reload=("fms_pkg_a.f", lambda x: x - 1, "fms_pkg_b")
        )
    )
    patcher.register(
        ModelPatcherRule(
            "swap-g", import_and_maybe_reload=("fms_pkg_a.g", lambda x: 0, "fms_pkg_b")
        )
    )
    patcher.register(
        ModelPatcherRule(
            "swap-loss", import_and_maybe_reload=("fms_pkg_a.TABLE.loss", "fast", None)
        )
    )
    records = patcher.patch()  # attribute swaps need no model
    assert sorted(r.rule_id for r in records) == ["swap-f", "swap-g", "swap-loss"]
    assert sys.modules["fms_pkg_b"].h(1) == 0  # both swaps seen through the one reload
    assert a.f(1) == 2 and a.g(1) == 3  # a reloaded module took them; the source is restored
    assert a.TABLE == {"loss": "fast"}  # no reload: the swap itself stays
    patcher.undo()
    assert sys.modules["fms_pkg_b"].h(1) == 23
    assert a.TABLE == {"loss": "plain"}


def test_reloads_of_nested_modules_are_refused(modules):
    importlib.import_module("fms_pkg_b.sub")
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule("outer", import_and_maybe_reload=("fms_pkg_a.f", len, "fms_pkg_b"))
    )
    patcher.register(
        ModelPatcherRule("inner", import_and_maybe_reload=("fms_pkg_a.g", len, "fms_pkg_b.sub"))
    )
    with pytest.raises(
        PatchError, match="reload a subpath `fms_pkg_b` multiple times in outer and inner"
    ):
        patcher.patch()


def test_import_rules_apply_to_their_model_only(modules):
    importlib.import_module("fms_pkg_b")

    class Model(torch.nn.Module):
        pass

    Model.__module__ = "fms_pkg_a"
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule("for-a", import_and_maybe_reload=("fms_pkg_a.TABLE.loss", "a", None))
    )
    patcher.register(ModelPatcherRule("for-b", import_and_maybe_reload=("fms_pkg_b.f", len, None)))
    patcher.register(
        ModelPatcherRule(
            "anywhere",
            import_and_maybe_reload=("fms_pkg_b.g", len, None),
            applies_to_any_model=True,
        )
    )
    patcher.patch(Model())
    assert sorted(patcher.counts()) == ["anywhere", "for-a"]
    assert sys.modules["fms_pkg_b"].f(1) == 2
    patcher.undo()


def test_unimportable_target_is_a_clear_error():
    patcher = ModelPatcher()
    patcher.register(ModelPatcherRule("x", import_and_maybe_reload=("zz_no_pkg.attr", 1, None)))
    with pytest.raises(PatchError, match="zz_no_pkg.attr"):
        patcher.patch()


def test_class_level_calls_reach_the_current_patcher_only():
    with pytest.raises(PatchError, match="outside a running framework"):
        ModelPatcher.register(
            ModelPatcherRule("x", trigger=ModelPatcherTrigger(Scale), forward=len)
        )
    assert ModelPatcher.history == [] and ModelPatcher.summary() == ""
    with instantiate_model_patcher() as first:
        ModelPatcher.register(
            ModelPatcherRule("zero", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: 0 * v)
        )
        with instantiate_model_patcher() as second:
            assert ModelPatcher.rules == {}
            assert second.rules == {}
        model = patch_model(_model())
        assert len(ModelPatcher.history) == 3
        assert ModelPatcher.history is first.history
    assert list(first.rules) == ["zero"]
    assert ModelPatcher.history == []
    torch.testing.assert_close(model(torch.ones(1, 2)), torch.zeros(1, 2))


def _collate(rows):
    return {"x": torch.stack(list(rows))}


def test_accelerator_patcher_replaces_dataloader_then_collator_at_prepare():
    from accelerate import Accelerator

    torch.manual_seed(3)
    data = [torch.randn(3) for _ in range(10)]
    loader = DataLoader(data, batch_size=4, collate_fn=_collate)
    accelerator = Accelerator(cpu=True)
    patcher = AcceleratorPatcher()

    def add_marker(old):
        def collate(rows):
            batch = old(rows)
            batch["marker"] = torch.full((len(rows),), 7)
            return batch

        return collate

    def bigger_batches(old, acc):
        assert acc is accelerator
        return DataLoader(old.dataset, batch_size=5, collate_fn=old.collate_fn)

    patcher.replace(
        "marker", AcceleratorPatcherComponent.data_collator, replacement_builder=add_marker
    )
    patcher.replace(
        "bigger", AcceleratorPatcherComponent.data_loader, replacement_builder=bigger_batches
    )
    with pytest.raises(PatchError, match="replace has already been called once on component"):
        patcher.replace("again", AcceleratorPatcherComponent.data_collator, replacement=_collate)
    with pytest.raises(PatchError, match="Rule 'marker' has already been added"):
        patcher.wrap_method("marker", "backward", lambda original: original)
    patcher.install(accelerator)
    prepared = accelerator.prepare(loader)
    batches = list(prepared)
    assert [b["x"].shape[0] for b in batches] == [5, 5]
    assert all(torch.equal(b["marker"], torch.full((5,), 7)) for b in batches)
    assert loader.collate_fn is _collate and loader.batch_size == 4  # the user's loader
    assert [(r.rule_id, r.module_name) for r in patcher.history[-2:]] == [
        ("bigger", "data_loader"),
        ("marker", "data_collator"),
    ]
    patcher.undo()
    assert "prepare" not in accelerator.__dict__
    plain = list(accelerator.prepare(loader))
    assert "marker" not in plain[0] and plain[0]["x"].shape[0] == 4


def test_skip_prepare_and_method_rules_and_class_level_replace():
    from accelerate import Accelerator

    class Replacement(DataLoader):
        pass

    accelerator = Accelerator(cpu=True)
    calls = []
    with instantiate_accel_patcher() as patcher:
        AcceleratorPatcher.replace(
            "swap",
            AcceleratorPatcherComponent.data_loader,
            replacement_builder=lambda dl, acc: Replacement([1, 2, 3]),
            skip_prepare=True,
        )
        patcher.wrap_method(
            "count-optimizers",
            "prepare_optimizer",
            lambda original: lambda *a, **k: calls.append(1) or original(*a, **k),
        )
        AcceleratorPatcher.patch(accelerator)
        assert "Rule: swap" in AcceleratorPatcher.summary()
    original_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    model = torch.nn.Linear(2, 2)
    loader, _model_out, _opt = accelerator.prepare(DataLoader([1, 2]), model, original_optimizer)
    assert type(loader) is Replacement  # not wrapped by accelerate: prepare was skipped
    assert calls == [1]
    patcher.undo()
    assert not {"prepare", "prepare_optimizer"} & set(accelerator.__dict__)


def test_trainer_patcher_wraps_and_restores_instance_methods():
    class Trainer:
        def get_batch_samples(self, iterator, n, device):
            return [next(iterator) for _ in range(n)], None

    trainer, other = Trainer(), Trainer()
    patcher = TrainerPatcher()
    patcher.wrap_method(
        "double",
        "get_batch_samples",
        lambda original: lambda it, n, device: ([2 * b for b in original(it, n, device)[0]], None),
    )
    with pytest.raises(PatchError, match="both wrap trainer.get_batch_samples"):
        patcher.wrap_method("again", "get_batch_samples", lambda original: original)
    patcher.install(trainer)
    patcher.install(trainer)  # once per object
    assert trainer.get_batch_samples(iter([1, 2, 3]), 2, None) == ([2, 4], None)
    assert other.get_batch_samples(iter([1, 2, 3]), 2, None) == ([1, 2], None)
    assert len(patcher.history) == 1
    patcher.undo()
    assert "get_batch_samples" not in trainer.__dict__


@pytest.mark.parametrize("order", ["newest first", "oldest first"])
def test_two_patchers_on_one_target_undo_in_any_order(modules, order):
    """Two frameworks in one process may patch the same function, table entry, forward and
    method; undoing them in either order brings every original back."""
    a = importlib.import_module("fms_pkg_a")
    original_f = a.f
    torch.manual_seed(7)
    model, x = _model(), torch.randn(5, 3)
    before = model(x)

    class Trainer:
        def step(self):
            return 1

    trainer = Trainer()
    patchers = []
    for n in (1, 2):
        patcher = ModelPatcher()
        patcher.register(
            ModelPatcherRule(
                f"f-{n}", import_and_maybe_reload=("fms_pkg_a.f", lambda x, n=n: n, None)
            )
        )
        patcher.register(
            ModelPatcherRule(f"loss-{n}", import_and_maybe_reload=("fms_pkg_a.TABLE.loss", n, None))
        )
        patcher.register(
            ModelPatcherRule(
                f"fwd-{n}",
                trigger=ModelPatcherTrigger(Scale, module_name="2"),
                forward=lambda s, v, n=n: v * 0 + n,
            )
        )
        patcher.patch()  # the attribute swaps
        patcher.patch(model)  # the forward
        methods = TrainerPatcher()
        methods.wrap_method(f"step-{n}", "step", lambda original, n=n: lambda: original() * 10 + n)
        methods.install(trainer)
        patchers.append((patcher, methods))

    assert (a.f(0), a.TABLE["loss"], trainer.step()) == (2, 2, 112)
    torch.testing.assert_close(model(x), torch.full_like(x, 2.0))
    first, second = patchers if order == "oldest first" else patchers[::-1]
    for patcher in first:
        patcher.undo()
    if order == "oldest first":
        # the newer patches stay on until their own undo
        assert (a.f(0), a.TABLE["loss"]) == (2, 2)
        torch.testing.assert_close(model(x), torch.full_like(x, 2.0))
    else:
        assert (a.f(0), a.TABLE["loss"], trainer.step()) == (1, 1, 11)
        torch.testing.assert_close(model(x), torch.full_like(x, 1.0))
    for patcher in second:
        patcher.undo()
    assert a.f is original_f and a.TABLE == {"loss": "plain"}
    assert trainer.step() == 1 and "step" not in trainer.__dict__
    torch.testing.assert_close(model(x), before)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_predicate_that_raises_on_every_module_is_named():
    """A typo in a predicate (`m.wieght`) raises everywhere: it judged nothing, so patching is
    refused rather than silently selecting nothing."""
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            rule_id="typo",
            trigger=ModelPatcherTrigger(check=lambda m: m.wieght.shape[0] == 4),
            forward=lambda self, x: x,
        )
    )
    with pytest.raises(PatchError) as info:
        patcher.patch(_model())
    assert str(info.value).startswith(
        "rule 'typo': its trigger raised on every module it was asked about, so it selects "
        "nothing; on <root>: AttributeError: 'Sequential' object has no attribute 'wieght'"
    )


def test_a_predicate_that_raises_on_some_modules_selects_the_others():
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            rule_id="rows",  # containers and activations have no weight: not selected
            trigger=ModelPatcherTrigger(check=lambda m: m.weight.shape[0] == 4),
            forward=lambda self, x: x,
        )
    )
    linears = [torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)]
    model = torch.nn.Sequential(linears[0], torch.nn.ReLU(), *linears[1:])
    patcher.patch(model)
    assert sorted(r.target for r in patcher.history) == ["0 (Linear)", "2 (Linear)"]
    patcher.undo()


def test_rules_registered_in_a_plugins_init_reach_the_framework():
    class RegistersInInit(AccelerationPlugin):
        def __init__(self, configurations):
            super().__init__(configurations)
            self.model_patcher.register(
                ModelPatcherRule(
                    rule_id="in-init",
                    trigger=ModelPatcherTrigger(check=torch.nn.ReLU),
                    forward=lambda self, x: x * 0,
                )
            )

        @property
        def requires_augmentation(self):
            return True

        def augmentation(self, model, train_args, modifiable_args):
            return model, modifiable_args

    AccelerationPlugin.register_plugin(RegistersInInit, configuration_and_paths=["training.x"])
    with pytest.warns(UserWarning, match="declares no schema"):
        framework = AccelerationFramework(
            {"plugins": {"training": {"x": {"on": True}}}}, plugin_classes=[RegistersInInit]
        )
    model = torch.nn.Sequential(Scale(2.0), torch.nn.ReLU())
    model.config = types.SimpleNamespace(architectures=["Toy"])
    framework.augmentation(model, None, None)
    assert framework.model_patcher.counts() == {"in-init": 1}
    assert torch.equal(model(torch.ones(2)), torch.zeros(2))
    framework.undo_patches()


def test_replaced_members_are_recorded_and_undo_carries_trained_values_back():
    """A submodule swapped for another, a parameter swapped for a copy and a submodule removed
    are patches like any other: undo carries what trained back into the originals, then puts
    them back in place, newest first."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    first, second = model[0], model[1]
    original_weight = second.weight
    patcher = ModelPatcher()
    carried = []

    def carry_linear(original, replacement):
        carried.append("module")
        original.weight.data.copy_(replacement.weight.data)

    def carry_weight(original, replacement):
        carried.append("parameter")
        original.data.copy_(replacement.data)

    swap = torch.nn.Linear(4, 6)
    patcher.replace_member("swap", model, "0", swap, where="model", carry_back=carry_linear)
    copy = torch.nn.Parameter(second.weight.detach() * 2)
    patcher.replace_member("shard", second, "weight", copy, where="model.1")
    patcher.replace_member("add", second, "extra", torch.nn.ReLU())
    assert model[0] is swap and second.weight is copy and isinstance(second.extra, torch.nn.ReLU)
    assert [(r.rule_id, r.kind) for r in patcher.history] == [
        ("swap", "module"),
        ("shard", "parameter"),
        ("add", "module"),
    ]
    assert patcher.history[0].target == "model.0 (Linear)"
    with torch.no_grad():
        swap.weight.add_(1.0)  # "training" of the replacement
    trained = swap.weight.detach().clone()
    patcher.undo()
    assert carried == ["module"]
    assert model[0] is first and second.weight is original_weight
    assert "extra" not in second._modules
    torch.testing.assert_close(first.weight, trained)
    # removing a member, then undoing, brings it back with its carried-back values
    patcher.replace_member(
        "drop", model, "1", None, carry_back=lambda original, gone: carried.append((original, gone))
    )
    assert len(model) == 1
    patcher.undo()
    assert model[1] is second and carried == ["module", (second, None)]
    with pytest.raises(PatchError, match="only a submodule or a parameter"):
        patcher.replace_member("bad", model, "nothing", torch.zeros(2))

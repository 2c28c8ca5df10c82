"""ModelPatcher and AcceleratorPatcher: triggers, builders, attribute swaps, history, undo."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

from fms_acceleration import (
    AcceleratorPatcher,
    ModelPatcher,
    ModelPatcherRule,
    ModelPatcherTrigger,
    PatchError,
)


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
    patcher.undo()
    torch.testing.assert_close(model(x), before)
    assert patcher.history == []
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_trigger_by_predicate_and_name_and_forward_builder():
    model, x = _model(), torch.randn(4, 5)
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            "nested-only",
            trigger=ModelPatcherTrigger(lambda m: isinstance(m, Scale), module_name=r"^1\."),
            forward_builder=lambda module: lambda v: v * (module.factor + 1),
        )
    )
    patcher.patch(model)
    assert patcher.counts() == {"nested-only": 1}
    torch.testing.assert_close(model(x), 5.0 * torch.relu(2.0 * x * 4.0))
    # applying again does nothing: a rule is applied once
    assert patcher.patch(model) == []


def test_rule_validation_and_duplicate_ids():
    with pytest.raises(PatchError, match="needs a trigger and exactly one of"):
        ModelPatcherRule("bad", trigger=ModelPatcherTrigger(Scale))
    with pytest.raises(PatchError, match="excludes trigger/forward"):
        ModelPatcherRule(
            "bad", trigger=ModelPatcherTrigger(Scale), import_and_maybe_reload=("a.b", 1, None)
        )
    with pytest.raises(PatchError, match="would undo the patch"):
        ModelPatcherRule("bad", import_and_maybe_reload=("pkg.mod.attr", 1, "pkg.mod"))
    patcher = ModelPatcher()
    rule = ModelPatcherRule("r", trigger=ModelPatcherTrigger(Scale), forward=lambda s, v: v)
    patcher.register(rule)
    with pytest.raises(PatchError, match="'r' is already registered"):
        patcher.register(rule)


@pytest.fixture
def two_modules(tmp_path, monkeypatch):
    """pkg_a defines f and TABLE; pkg_b imports f by name (so needs a reload to see a swap)."""
    (tmp_path / "fms_test_pkg_a.py").write_text(
        textwrap.dedent(
            """
            def f(x):
                return x + 1

            TABLE = {"loss": "plain"}
            """
        )
    )
    (tmp_path / "fms_test_pkg_b.py").write_text(
        "from fms_test_pkg_a import f\n\ndef g(x):\n    return f(x) * 10\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("fms_test_pkg_a", "fms_test_pkg_b"):
        sys.modules.pop(name, None)


def test_import_and_reload_rule_and_mapping_item(two_modules):
    a = importlib.import_module("fms_test_pkg_a")
    b = importlib.import_module("fms_test_pkg_b")
    assert b.g(1) == 20
    patcher = ModelPatcher()
    patcher.register(
        ModelPatcherRule(
            "swap-f",
            import_and_maybe_reload=("fms_test_pkg_a.f", lambda x: x - 1, "fms_test_pkg_b"),
        )
    )
    patcher.register(
        ModelPatcherRule(
            "swap-loss", import_and_maybe_reload=("fms_test_pkg_a.TABLE.loss", "fast", None)
        )
    )
    records = patcher.patch()  # attribute swaps need no model
    assert [r.kind for r in records] == ["attribute", "attribute"]
    assert sys.modules["fms_test_pkg_b"].g(1) == 0
    assert a.TABLE == {"loss": "fast"}
    patcher.undo()
    assert sys.modules["fms_test_pkg_b"].g(1) == 20
    assert a.f(1) == 2
    assert a.TABLE == {"loss": "plain"}


def test_unimportable_target_is_a_clear_error():
    patcher = ModelPatcher()
    patcher.register(ModelPatcherRule("x", import_and_maybe_reload=("zz_no_pkg.attr", 1, None)))
    with pytest.raises(PatchError, match="zz_no_pkg.attr"):
        patcher.patch()


def _collate(rows):
    return {"x": torch.stack([r for r in rows])}


def test_accelerator_patcher_replaces_collator_and_dataloader_at_prepare():
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

    class Counting:
        def __init__(self, inner):
            self.inner, self.batches = inner, 0

        def __iter__(self):
            for batch in self.inner:
                self.batches += 1
                yield batch

        def __len__(self):
            return len(self.inner)

    patcher.replace_collator("marker", add_marker)
    wrapped: list[Counting] = []
    patcher.replace_dataloader("count", lambda dl: wrapped.append(Counting(dl)) or wrapped[-1])
    with pytest.raises(PatchError, match="both replace the data_collator"):
        patcher.replace_collator("again", add_marker)
    patcher.install(accelerator)
    prepared = accelerator.prepare(loader)
    batches = list(prepared)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(torch.equal(b["marker"], torch.full((b["x"].shape[0],), 7)) for b in batches)
    assert wrapped[0].batches == 3
    assert loader.collate_fn is _collate  # the user's loader is untouched
    assert [(r.rule_id, r.target) for r in patcher.history] == [
        ("marker", "data_collator"),
        ("count", "dataloader"),
    ]
    patcher.undo()
    assert "prepare" not in accelerator.__dict__
    plain = list(accelerator.prepare(loader))
    assert "marker" not in plain[0]

"""Replacing the data collator or the dataloader where `accelerator.prepare` receives them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from .errors import PatchError

COLLATOR = "data_collator"
DATALOADER = "dataloader"


@dataclass(frozen=True)
class AcceleratorPatchRule:
    """A builder applied to every DataLoader passed to `accelerator.prepare`."""

    rule_id: str
    target: str  # COLLATOR or DATALOADER
    builder: Callable[[Any], Any]


@dataclass(frozen=True)
class AcceleratorPatchRecord:
    """One replacement made while preparing a dataloader."""

    rule_id: str
    target: str
    description: str


class AcceleratorPatcher:
    """Holds collator/dataloader rules; `install(accelerator)` wraps its `prepare`."""

    def __init__(self) -> None:
        self._rules: dict[str, AcceleratorPatchRule] = {}
        self._installed: list[tuple[Any, Any]] = []
        self.history: list[AcceleratorPatchRecord] = []

    @property
    def rules(self) -> tuple[AcceleratorPatchRule, ...]:
        return tuple(self._rules.values())

    def replace_collator(self, rule_id: str, builder: Callable[[Any], Any]) -> None:
        """`builder(old_collate_fn) -> new_collate_fn` for every prepared DataLoader."""
        self._add(AcceleratorPatchRule(rule_id, COLLATOR, builder))

    def replace_dataloader(self, rule_id: str, builder: Callable[[DataLoader], Any]) -> None:
        """`builder(old_dataloader) -> new_dataloader` for every prepared DataLoader."""
        self._add(AcceleratorPatchRule(rule_id, DATALOADER, builder))

    def _add(self, rule: AcceleratorPatchRule) -> None:
        if rule.rule_id in self._rules:
            raise PatchError(f"an accelerator rule with id '{rule.rule_id}' is already registered")
        for existing in self._rules.values():
            if existing.target == rule.target:
                raise PatchError(
                    f"accelerator rules '{existing.rule_id}' and '{rule.rule_id}' both replace "
                    f"the {rule.target}"
                )
        self._rules[rule.rule_id] = rule

    def transform(self, dataloader: DataLoader) -> Any:
        """Apply the collator rule, then the dataloader rule, to one DataLoader (not in place)."""
        result: Any = dataloader
        for target in (COLLATOR, DATALOADER):
            for rule in self._rules.values():
                if rule.target != target:
                    continue
                if target == COLLATOR:
                    # DataLoader forbids changing its sampler after init, but collate_fn is free.
                    replaced = copy.copy(result)
                    replaced.collate_fn = rule.builder(result.collate_fn)
                    result = replaced
                else:
                    result = rule.builder(result)
                self.history.append(
                    AcceleratorPatchRecord(rule.rule_id, target, f"{type(result).__name__}")
                )
        return result

    def install(self, accelerator: Any) -> None:
        """Wrap `accelerator.prepare` so DataLoaders pass through `transform` first."""
        if not self._rules:
            return
        if any(acc is accelerator for acc, _ in self._installed):
            return
        original = accelerator.__dict__.get("prepare")
        bound = accelerator.prepare

        def prepare(*args: Any, **kwargs: Any) -> Any:
            args = tuple(self.transform(a) if isinstance(a, DataLoader) else a for a in args)
            return bound(*args, **kwargs)

        accelerator.prepare = prepare
        self._installed.append((accelerator, original))

    def undo(self) -> None:
        """Restore every wrapped `prepare` and forget the history."""
        while self._installed:
            accelerator, original = self._installed.pop()
            if original is None:
                accelerator.__dict__.pop("prepare", None)
            else:
                accelerator.prepare = original
        self.history.clear()

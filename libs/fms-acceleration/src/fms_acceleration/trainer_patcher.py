"""Wrapping methods of one object (a Trainer, an Accelerator) so that undo restores them.

A rule names a method and a builder: `builder(original_bound_method) -> replacement`. Installing
on an object sets the replacement as an instance attribute; undo removes it (or puts back the
instance attribute that was there), so the class and other instances are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

from .errors import PatchError, PatchTypeError
from .model_patcher import RecordingPatcher
from .patch_records import PatchRecord, install


@dataclass(frozen=True)
class MethodRule:
    """Replace `method` of the installed object with `builder(original bound method)`."""

    rule_id: str
    method: str
    builder: Callable[[MethodType], Callable[..., Any]]


class MethodPatcher(RecordingPatcher):
    """Method rules, installed on objects of one kind and undone together."""

    kind = "object"

    def __init__(self) -> None:
        super().__init__()
        self._method_rules: dict[str, MethodRule] = {}
        self._installed: set[tuple[int, str]] = set()

    @property
    def method_rules(self) -> tuple[MethodRule, ...]:
        return tuple(self._method_rules.values())

    def wrap_method(
        self, rule_id: str, method: str, builder: Callable[[MethodType], Callable[..., Any]]
    ) -> None:
        """Register a method rule; one rule per method, ids unique."""
        if not callable(builder):
            raise PatchTypeError(f"rule '{rule_id}': builder must be callable, got {builder!r}")
        if rule_id in self._rule_ids():
            raise PatchError(f"Rule '{rule_id}' has already been added")
        for existing in self._method_rules.values():
            if existing.method == method:
                raise PatchError(
                    f"rules '{existing.rule_id}' and '{rule_id}' both wrap {self.kind}.{method}"
                )
        self._method_rules[rule_id] = MethodRule(rule_id, method, builder)

    def _rule_ids(self) -> set[str]:
        return set(self._method_rules)

    def install(self, obj: Any) -> list[PatchRecord]:
        """Apply every method rule not yet applied to `obj`."""
        records = []
        for rule in self._method_rules.values():
            key = (id(obj), rule.rule_id)
            if key in self._installed:
                continue
            original = getattr(obj, rule.method, None)
            if original is None or not callable(original):
                raise PatchError(
                    f"rule '{rule.rule_id}': {type(obj).__name__} has no method '{rule.method}'"
                )
            record = PatchRecord(
                rule.rule_id,
                "method",
                f"{type(obj).__name__}.{rule.method}",
                cls=type(obj).__name__,
                module_name=rule.method,
                instance=id(obj),
                _owner=obj,
                _name=rule.method,
            )
            records.append(install(record, rule.builder(original)))
            self._installed.add(key)
        self._history.extend(records)
        return records

    def undo(self) -> None:
        """Restore every wrapped method, newest first."""
        super().undo()
        self._installed.clear()


class TrainerPatcher(MethodPatcher):
    """Method rules for the Trainer (e.g. batch hooks at `get_batch_samples`)."""

    kind = "trainer"

"""Rule-based model patching: forward replacement on matching modules, attribute replacement in
imported modules, each recorded so it can be listed and undone."""

from __future__ import annotations

import importlib
import re
import types
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PatchError

_MISSING = object()


@dataclass(frozen=True)
class ModelPatcherTrigger:
    """Selects modules: by class (or tuple of classes) or by predicate, optionally by name."""

    check: type | tuple[type, ...] | Callable[[torch.nn.Module], bool]
    module_name: str | None = None

    def is_triggered(self, module: torch.nn.Module, name: str) -> bool:
        if self.module_name is not None and not re.search(self.module_name, name):
            return False
        if isinstance(self.check, (type, tuple)):
            return isinstance(module, self.check)
        return bool(self.check(module))


@dataclass(frozen=True)
class ModelPatcherRule:
    """One patch: a new forward for triggered modules, or an attribute swap in a module."""

    rule_id: str
    trigger: ModelPatcherTrigger | None = None
    forward: Callable[..., Any] | None = None
    forward_builder: Callable[[torch.nn.Module], Callable[..., Any]] | None = None
    import_and_maybe_reload: tuple[str, Any, str | None] | None = None

    def __post_init__(self) -> None:
        forwards = (self.forward is not None) + (self.forward_builder is not None)
        if self.import_and_maybe_reload is not None:
            if self.trigger is not None or forwards:
                raise PatchError(
                    f"rule '{self.rule_id}': import_and_maybe_reload excludes trigger/forward"
                )
            target, _, reload_name = self.import_and_maybe_reload
            owner_module = target.rpartition(".")[0]
            if reload_name is not None and reload_name == owner_module:
                raise PatchError(
                    f"rule '{self.rule_id}': reloading '{reload_name}' would undo the patch of "
                    f"'{target}'; name the module that imports it instead"
                )
            return
        if self.trigger is None or forwards != 1:
            raise PatchError(
                f"rule '{self.rule_id}': needs a trigger and exactly one of forward / "
                "forward_builder (or import_and_maybe_reload alone)"
            )

    @property
    def is_import_rule(self) -> bool:
        return self.import_and_maybe_reload is not None


@dataclass(frozen=True)
class PatchRecord:
    """What one applied patch changed, enough to describe and revert it."""

    rule_id: str
    kind: str  # "forward" or "attribute"
    target: str
    owner: Any
    name: str
    previous: Any
    reload: str | None = None

    def undo(self) -> None:
        if self.kind == "forward":
            if self.previous is _MISSING:
                self.owner.__dict__.pop("forward", None)
            else:
                self.owner.forward = self.previous
            return
        _assign(self.owner, self.name, self.previous)
        if self.reload:
            importlib.reload(importlib.import_module(self.reload))


def _assign(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, MutableMapping):
        if value is _MISSING:
            owner.pop(name, None)
        else:
            owner[name] = value
    elif value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


def _resolve_owner(target: str) -> tuple[Any, str]:
    """Split 'pkg.module.Obj.attr' (or '...MAPPING.key') into the owning object and the leaf."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:-1]:
            owner = owner[part] if isinstance(owner, MutableMapping) else getattr(owner, part)
        return owner, parts[-1]
    raise PatchError(f"cannot import any module of patch target '{target}'")


class ModelPatcher:
    """Holds rules, applies them to a model and to imported modules, and can undo them all."""

    def __init__(self) -> None:
        self._rules: dict[str, ModelPatcherRule] = {}
        self._applied: set[str] = set()
        self.history: list[PatchRecord] = []

    @property
    def rules(self) -> tuple[ModelPatcherRule, ...]:
        return tuple(self._rules.values())

    def register(self, rule: ModelPatcherRule) -> None:
        """Add a rule; its id must be unique in this patcher."""
        if rule.rule_id in self._rules:
            raise PatchError(f"a patch rule with id '{rule.rule_id}' is already registered")
        self._rules[rule.rule_id] = rule

    def patch(self, model: torch.nn.Module | None = None) -> list[PatchRecord]:
        """Apply every rule not applied yet; attribute swaps first, then forwards on `model`."""
        pending = [r for r in self._rules.values() if r.rule_id not in self._applied]
        records: list[PatchRecord] = []
        for rule in sorted(pending, key=lambda r: not r.is_import_rule):
            if rule.is_import_rule:
                records.append(self._swap_attribute(rule))
            elif model is not None:
                records.extend(self._replace_forwards(rule, model))
            else:
                continue
            self._applied.add(rule.rule_id)
        self.history.extend(records)
        return records

    def undo(self) -> None:
        """Revert every recorded patch, newest first, and forget the applied state."""
        while self.history:
            self.history.pop().undo()
        self._applied.clear()

    def counts(self) -> dict[str, int]:
        """How many targets each applied rule patched."""
        out: dict[str, int] = {}
        for record in self.history:
            out[record.rule_id] = out.get(record.rule_id, 0) + 1
        return out

    def _swap_attribute(self, rule: ModelPatcherRule) -> PatchRecord:
        target, replacement, reload_name = rule.import_and_maybe_reload  # type: ignore[misc]
        owner, name = _resolve_owner(target)
        if isinstance(owner, MutableMapping):
            previous = owner.get(name, _MISSING)
        else:
            previous = getattr(owner, name, _MISSING)
        _assign(owner, name, replacement)
        if reload_name:
            importlib.reload(importlib.import_module(reload_name))
        return PatchRecord(rule.rule_id, "attribute", target, owner, name, previous, reload_name)

    def _replace_forwards(
        self, rule: ModelPatcherRule, model: torch.nn.Module
    ) -> list[PatchRecord]:
        records = []
        assert rule.trigger is not None  # guaranteed by ModelPatcherRule.__post_init__
        for name, module in model.named_modules():
            if not rule.trigger.is_triggered(module, name):
                continue
            previous = module.__dict__.get("forward", _MISSING)
            if rule.forward_builder is not None:
                module.forward = rule.forward_builder(module)
            else:
                module.forward = types.MethodType(rule.forward, module)
            qualified = f"{name or '<root>'} ({type(module).__name__})"
            records.append(
                PatchRecord(rule.rule_id, "forward", qualified, module, "forward", previous)
            )
        return records

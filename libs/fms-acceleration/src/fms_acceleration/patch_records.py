"""The record every patcher keeps of what it changed, and the one way patches are installed.

Two frameworks in one process may patch the same attribute (a module function, a method, a
module's forward). Each installed patch is a layer on that attribute, oldest first, so the
frameworks can be undone in any order: undoing the newest layer restores what it replaced;
undoing an older one hands what it replaced to the layer above, which restores it later. After
every framework is undone the original is back, whatever the order.
"""

from __future__ import annotations

import importlib
import types
import weakref
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .errors import PatchError

MISSING = object()

# (id(owner), name) -> the live layers on that attribute, oldest first. Weak, so that a
# framework dropped without undo does not keep its models alive; a live record holds its owner,
# so the id cannot be reused while an entry has live layers.
_LAYERS: dict[tuple[int, str], list[weakref.ref[PatchRecord]]] = {}


@dataclass(eq=False)
class PatchRecord:
    """What one applied patch changed: enough to describe it and to revert it."""

    rule_id: str
    kind: str  # "forward", "attribute", "method" or a replacement kind
    target: str
    cls: str = ""
    module_name: str = ""
    parent_cls: str = ""
    parent_module_name: str = ""
    instance: int = 0
    _owner: Any = field(default=None, repr=False)
    _name: str = field(default="", repr=False)
    _previous: Any = field(default=MISSING, repr=False)
    _installed: Any = field(default=MISSING, repr=False)
    _reload: str | None = field(default=None, repr=False)
    _restore: Callable[[], None] | None = field(default=None, repr=False)

    def undo(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
            return
        if self._reload:
            importlib.reload(importlib.import_module(self._reload))
            return
        if self._owner is None:
            return  # a record of a replacement made on a copy: nothing to restore
        key = (id(self._owner), self._name)
        layers = _live_layers(key)
        index = next((i for i, layer in enumerate(layers) if layer() is self), None)
        if index == len(layers) - 1:
            assign(self._owner, self._name, self._previous)
        elif index is not None:
            # a later patch sits on top of this one: it now restores what this one replaced
            above = layers[index + 1]()
            above._previous = self._previous  # type: ignore[union-attr]
        if index is not None:  # else undone already
            del layers[index]
        if not layers:
            _LAYERS.pop(key, None)

    def problem(self) -> str | None:
        """Why this patch is not what its target holds now (None when it is, or cannot be
        told: a patch picked up by a module reload, or one made on a copy)."""
        if self._owner is None or self._reload or self._installed is MISSING:
            return None
        layers = _live_layers((id(self._owner), self._name))
        if not any(layer() is self for layer in layers):
            return None  # undone
        top = layers[-1]()
        now = current_value(self._owner, self._name)
        if top is None or _wraps(now, top._installed):
            return None  # ours, a wrapper that calls ours, or a later framework's layer
        where = "its forward" if self.kind == "forward" else f"'{self._name}'"
        return f"{where} was replaced after patching (now {_describe(now)})"

    def as_row(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "cls": self.cls,
            "parent_cls": self.parent_cls,
            "module_name": self.module_name,
            "parent_module_name": self.parent_module_name,
            "rule_id": self.rule_id,
        }


# deeper than any wrapper stack a library puts on a forward (accelerate's is three)
_MAX_WRAPPERS = 16


def _wraps(value: Any, installed: Any) -> bool:
    """Whether `value` is `installed` or a declared wrapper of it (functools.wraps' __wrapped__,
    a bound method's __func__): accelerate's mixed precision wraps a model's forward in autocast
    and convert_outputs_to_fp32, which still call ours."""
    targets = {id(installed), id(getattr(installed, "__func__", installed))}
    for _ in range(_MAX_WRAPPERS):
        if value is None:
            return False
        if id(value) in targets:
            return True
        value = getattr(value, "__wrapped__", None) or getattr(value, "__func__", None)
    return False


def _describe(value: Any) -> str:
    if value is MISSING:
        return "the class's own"
    function = getattr(value, "__func__", value)
    name = getattr(function, "__qualname__", None) or type(value).__qualname__
    return f"{getattr(function, '__module__', '?')}.{name}"


def _live_layers(key: tuple[int, str]) -> list[weakref.ref[PatchRecord]]:
    layers = [layer for layer in _LAYERS.get(key, ()) if layer() is not None]
    _LAYERS[key] = layers
    return layers


def install(record: PatchRecord, value: Any) -> PatchRecord:
    """Set `value` at the record's owner and name as the newest layer there; undo reverts it."""
    record._previous = current_value(record._owner, record._name)
    record._installed = value
    assign(record._owner, record._name, value)
    _live_layers((id(record._owner), record._name)).append(weakref.ref(record))
    return record


def assign(owner: Any, name: str, value: Any) -> None:
    if isinstance(owner, MutableMapping):
        if value is MISSING:
            owner.pop(name, None)
        else:
            owner[name] = value
    elif value is MISSING:
        if name in getattr(owner, "__dict__", {}):
            delattr(owner, name)
    else:
        setattr(owner, name, value)


def current_value(owner: Any, name: str) -> Any:
    if isinstance(owner, MutableMapping):
        return owner.get(name, MISSING)
    # an instance's or a class's own attribute: an inherited one is not ours to restore, undo
    # removes what we set so the inherited one shows again
    if not isinstance(owner, types.ModuleType) and hasattr(owner, "__dict__"):
        return owner.__dict__.get(name, MISSING)
    return getattr(owner, name, MISSING)


def _resolve_owner(target: str) -> tuple[Any, str]:
    """Split 'pkg.module.Obj.attr' (or '...MAPPING.key') into the owning object and the leaf."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for part in parts[split:-1]:
                owner = owner[part] if isinstance(owner, MutableMapping) else getattr(owner, part)
        except (AttributeError, KeyError):
            raise PatchError(f"patch target '{target}': '{module_name}' has no '{part}'") from None
        return owner, parts[-1]
    raise PatchError(f"cannot import any module of patch target '{target}'")


def swap_attribute(rule_id: str, target: str, replacement: Any) -> PatchRecord:
    """Replace the object at dotted `target` until the returned record is undone."""
    owner, name = _resolve_owner(target)
    return install(PatchRecord(rule_id, "attribute", target, _owner=owner, _name=name), replacement)

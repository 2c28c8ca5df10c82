"""Replacing a submodule or a parameter of a module as a recorded patch.

Some accelerations cannot be a new forward: they put another module in a block's place (fused
weights instead of per-expert layers) or another parameter in a module (a shard of it). Such a
replacement is a layer on the module's `_modules` / `_parameters` entry like any other patch,
so undo puts the original object back. What training changed lives in the replacement; a
`carry_back(original, replacement)` callback copies it into the original first, so after undo
the original modules hold the trained values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PatchTypeError
from .patch_records import MISSING, PatchRecord, current_value, install

CarryBack = Callable[[Any, Any], None]


@dataclass(eq=False)
class MemberRecord(PatchRecord):
    """A replaced submodule or parameter; undo carries the trained values back, then restores."""

    _replacement: Any = field(default=None, repr=False)
    _carry_back: CarryBack | None = field(default=None, repr=False)

    def undo(self) -> None:
        carry_back, self._carry_back = self._carry_back, None
        if carry_back is not None:
            carry_back(None if self._previous is MISSING else self._previous, self._replacement)
        super().undo()


def _table(module: torch.nn.Module, name: str, replacement: Any) -> tuple[dict[str, Any], str]:
    if name in module._modules or isinstance(replacement, torch.nn.Module):
        return module._modules, "module"
    if name in module._parameters or isinstance(replacement, torch.nn.Parameter):
        return module._parameters, "parameter"
    raise PatchTypeError(
        f"{type(module).__name__}.{name}: only a submodule or a parameter can be replaced, got "
        f"{type(replacement).__name__}"
    )


def replace_member(
    rule_id: str,
    module: torch.nn.Module,
    name: str,
    replacement: torch.nn.Module | torch.nn.Parameter | None,
    *,
    where: str = "",
    carry_back: CarryBack | None = None,
) -> MemberRecord:
    """Put `replacement` (None: nothing) at submodule or parameter `name` of `module` until the
    returned record is undone. `where` names the module in its model for the summary."""
    table, kind = _table(module, name, replacement)
    current = current_value(table, name)
    target = f"{where or type(module).__name__}.{name}"
    record = MemberRecord(
        rule_id,
        kind,
        f"{target} ({type(current).__name__ if current is not MISSING else 'new'})",
        cls=type(module).__name__,
        module_name=name,
        parent_module_name=where,
        instance=id(module),
        _owner=table,
        _name=name,
        _replacement=replacement,
        _carry_back=carry_back,
    )
    install(record, MISSING if replacement is None else replacement)
    return record

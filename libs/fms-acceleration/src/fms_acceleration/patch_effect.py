"""Whether applied patches take effect: what the model will call is what a plugin installed.

transformers changes how modules are built from release to release: 5.2x re-kernelizes layers
decorated for the kernels hub on every train()/eval() switch, which drops forwards set on
instances, and a release may stop calling a module function through its module global. A patch
that is recorded but never called trains without the acceleration the user asked for, so every
record is checked when the framework is ready for train and again after training steps.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from .patch_records import PatchRecord


@dataclass(frozen=True)
class IneffectivePatch:
    """A patch that is not what the model will call, and why."""

    rule_id: str
    target: str
    reason: str

    def describe(self) -> str:
        return f"patch '{self.rule_id}' on {self.target}: {self.reason}"


def ineffective_patches(
    records: Iterable[PatchRecord], *, call_sites: bool = True
) -> list[IneffectivePatch]:
    """The records whose target no longer holds the patch; with `call_sites`, also module
    functions that nothing in their module calls by name any more (checked once, statically)."""
    found = []
    for record in records:
        reason = record.problem()
        if reason is None and call_sites:
            reason = _uncalled_module_function(record)
        if reason is not None:
            found.append(IneffectivePatch(record.rule_id, record.target, reason))
    return found


def _uncalled_module_function(record: PatchRecord) -> str | None:
    owner = record._owner
    if record.kind != "attribute" or not isinstance(owner, types.ModuleType):
        return None
    if not callable(record._installed) or isinstance(record._installed, type):
        return None
    if _called_by_name(owner.__name__, record._name):
        return None
    return (
        f"no function or class of {owner.__name__} calls '{record._name}' by name, so the "
        "replacement is never called"
    )


@cache
def _called_by_name(module_name: str, name: str) -> bool:
    """Whether code defined in the module looks `name` up as a global (code does not change
    while a process runs, so the answer is kept)."""
    import sys

    module = sys.modules[module_name]
    return any(name in code.co_names for code in _module_code(module) if code.co_name != name)


def _module_code(module: types.ModuleType) -> Iterator[types.CodeType]:
    """Every code object of the functions and class members defined in `module`, through
    decorators that keep the original as `__wrapped__` (transformers' and the kernels hub's)."""
    seen: set[int] = set()
    for value in list(vars(module).values()):
        members = vars(value).values() if inspect.isclass(value) else (value,)
        for member in list(members):
            for function in _functions(member):
                if getattr(function, "__module__", None) != module.__name__:
                    continue
                yield from _nested(function.__code__, seen)


def _functions(member: Any) -> Iterator[Callable[..., Any]]:
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property):
        yield from (f for f in (member.fget, member.fset) if f is not None)
        return
    while inspect.isfunction(member):
        yield member
        member = getattr(member, "__wrapped__", None)


def _nested(code: types.CodeType, seen: set[int]) -> Iterator[types.CodeType]:
    if id(code) in seen:
        return
    seen.add(id(code))
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const, seen)

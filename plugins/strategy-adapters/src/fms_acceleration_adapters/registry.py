"""Find strategy adapters: built-ins, entry points, and ``module:Class`` references."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from fms_acceleration.constants import STRATEGY_ADAPTER_GROUP
from fms_acceleration.packages import (
    BrokenEntryPoint,
    LoadedEntryPoint,
    entry_points_of,
    load_entry_points,
)
from fms_acceleration.validation import suggestion

from .base import StrategyAdapter
from .errors import StrategyAdapterError

ENTRY_POINT_GROUP = STRATEGY_ADAPTER_GROUP

# The one place built-in adapters are registered (name -> "module:Class", imported on demand).
BUILTIN_ADAPTERS: Mapping[str, str] = {
    "single_device": "fms_acceleration_adapters.base:StrategyAdapter",
    "ddp": "fms_acceleration_adapters.ddp:DDPStrategyAdapter",
    "fsdp": "fms_acceleration_adapters.fsdp:FSDPStrategyAdapter",
    "peft": "fms_acceleration_adapters.peft:PeftStrategyAdapter",
}

# accelerate's DistributedType values (lowercased) whose adapter name differs from the value.
_DISTRIBUTED_TYPE_ALIASES: Mapping[str, str] = {"no": "single_device"}


class StrategyAdapterWarning(UserWarning):
    """A strategy-adapter entry point was skipped (broken, duplicate, or shadowing a built-in)."""


def strategy_adapter_entry_points() -> dict[str, metadata.EntryPoint]:
    """Entry points of group ``fms_acceleration.strategy_adapters`` by lowercased name, unloaded.

    Duplicates keep the first (by package name) and warn naming both; a name that shadows a
    built-in adapter is ignored with a warning.
    """
    found: dict[str, metadata.EntryPoint] = {}
    for ep in entry_points_of(ENTRY_POINT_GROUP):
        name = ep.name.lower()
        if name in BUILTIN_ADAPTERS:
            warnings.warn(
                f"strategy adapter entry point {ep.name!r} = {ep.value!r} from "
                f"{_dist_name(ep)!r} shadows the built-in adapter of that name and is ignored; "
                f"select it with custom_strategy_adapters instead",
                StrategyAdapterWarning,
                stacklevel=2,
            )
        elif name in found and found[name].value != ep.value:
            warnings.warn(
                f"strategy adapter entry point {ep.name!r} is declared twice: {found[name].value!r}"
                f" from {_dist_name(found[name])!r} (kept) and {ep.value!r} from "
                f"{_dist_name(ep)!r} (ignored)",
                StrategyAdapterWarning,
                stacklevel=2,
            )
        else:
            found.setdefault(name, ep)
    return found


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "<unknown distribution>"


def _load_adapter_entry_points(
    entry_points: list[metadata.EntryPoint],
) -> tuple[list[LoadedEntryPoint], list[BrokenEntryPoint]]:
    """Load entry points; one whose ep.load() fails is imported again from its value as a
    'module:Class' or 'module.Class' reference (importlib reads 'pkg.mod.Class' as a module
    name), as Fine-Tuning Scheduler's discovery does."""
    loaded, failed = load_entry_points(entry_points)
    broken = []
    for entry in failed:
        try:
            obj = _import_reference(entry.value, entry.name)
        except StrategyAdapterError as exc:
            broken.append(
                BrokenEntryPoint(
                    entry.name,
                    entry.value,
                    entry.package,
                    entry.version,
                    f"{entry.problem}; as a 'module.Class' reference: {_reason(exc)}",
                )
            )
            continue
        loaded.append(LoadedEntryPoint(entry.name, entry.value, entry.package, entry.version, obj))
    return loaded, broken


def _reason(exc: StrategyAdapterError) -> str:
    # the reference error repeats the entry point's name and value, which describe() shows
    return str(exc).split(": ", 1)[-1]


def discover_strategy_adapters() -> dict[str, type[StrategyAdapter]]:
    """All adapters by name: built-ins plus loadable entry points (a broken one only warns)."""
    adapters: dict[str, type[StrategyAdapter]] = {
        name: _load_reference(ref, name) for name, ref in BUILTIN_ADAPTERS.items()
    }
    loaded, broken = _load_adapter_entry_points(list(strategy_adapter_entry_points().values()))
    for entry in loaded:
        try:
            adapters[entry.name.lower()] = _check_adapter_class(entry.obj, entry.name)
        except StrategyAdapterError as exc:
            broken.append(
                BrokenEntryPoint(entry.name, entry.value, entry.package, entry.version, str(exc))
            )
    for entry in broken:
        warnings.warn(
            f"strategy adapter entry point {entry.describe()}; it is skipped",
            StrategyAdapterWarning,
            stacklevel=2,
        )
    return adapters


def resolve_strategy_adapter(ref: str | type[StrategyAdapter]) -> type[StrategyAdapter]:
    """Adapter class for an adapter name, ``module:Class`` or ``module.Class`` reference."""
    if isinstance(ref, type):
        return _check_adapter_class(ref, repr(ref))
    if not isinstance(ref, str) or not ref.strip():
        raise StrategyAdapterError(
            f"strategy adapter reference {ref!r}: expected an adapter name, 'module:Class' "
            f"or 'module.Class'"
        )
    ref = ref.strip()
    name = ref.lower()
    if name in BUILTIN_ADAPTERS:
        return _load_reference(BUILTIN_ADAPTERS[name], ref)
    eps = strategy_adapter_entry_points()
    if name in eps:
        loaded, broken = _load_adapter_entry_points([eps[name]])
        if broken:
            raise StrategyAdapterError(
                f"strategy adapter {ref!r}: entry point {broken[0].describe()}"
            )
        return _check_adapter_class(loaded[0].obj, ref)
    if ":" in ref or "." in ref:
        return _load_reference(ref, ref)
    known = sorted({*BUILTIN_ADAPTERS, *eps})
    raise StrategyAdapterError(
        f"strategy adapter {ref!r} is neither a registered adapter name ({known}) nor a "
        f"'module:Class' / 'module.Class' reference"
    )


def _load_reference(ref: str, label: str) -> type[StrategyAdapter]:
    return _check_adapter_class(_import_reference(ref, label), label)


def _import_reference(ref: str, label: str) -> Any:
    """The object a 'module:attr' or 'module.attr' reference names."""
    if not isinstance(ref, str):
        raise StrategyAdapterError(f"strategy adapter {label!r}: no reference (value {ref!r})")
    if ":" in ref:
        module_name, _, attr_path = ref.partition(":")
    else:
        module_name, _, attr_path = ref.rpartition(".")
    if not module_name or not attr_path:
        raise StrategyAdapterError(
            f"strategy adapter {label!r}: {ref!r} is not of the form 'module:Class' or "
            f"'module.Class'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise StrategyAdapterError(
            f"strategy adapter {label!r}: cannot import module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise StrategyAdapterError(
                f"strategy adapter {label!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
        obj = getattr(obj, attr)
    return obj


def _check_adapter_class(obj: Any, label: str) -> type[StrategyAdapter]:
    if not (isinstance(obj, type) and issubclass(obj, StrategyAdapter)):
        raise StrategyAdapterError(
            f"strategy adapter {label!r} resolves to {obj!r}, which is not a subclass of "
            f"fms_acceleration_adapters.StrategyAdapter"
        )
    return obj


def adapter_name_for(distributed_type: Any) -> str:
    """Adapter name for an accelerate ``DistributedType`` (enum or string) or an adapter name."""
    value = getattr(distributed_type, "value", distributed_type)
    if not isinstance(value, str) or not value:
        raise StrategyAdapterError(
            f"distributed_type={distributed_type!r}: expected an accelerate DistributedType or "
            f"its string value (e.g. 'NO', 'MULTI_GPU', 'FSDP')"
        )
    name = value.lower()
    if name in _DISTRIBUTED_TYPE_ALIASES:
        return _DISTRIBUTED_TYPE_ALIASES[name]
    if name.startswith("multi_"):
        # MULTI_CPU / MULTI_GPU / MULTI_XPU ...: accelerate wraps the model in DDP
        return "ddp"
    return name


def distributed_type_of(accelerator_or_none: Any) -> str:
    """Adapter name for an Accelerator (or AcceleratorState); ``None`` means single device."""
    if accelerator_or_none is None:
        return "single_device"
    dtype = getattr(accelerator_or_none, "distributed_type", None)
    if dtype is None:
        raise StrategyAdapterError(
            f"distributed_type_of({type(accelerator_or_none).__name__}): object has no "
            f"'distributed_type' (expected an accelerate Accelerator or state)"
        )
    return adapter_name_for(dtype)


def strategy_names() -> list[str]:
    """Strategy names a ``custom_strategy_adapters`` key may take: accelerate's distributed
    types (as adapter names: ``single_device``, ``ddp``, ``fsdp``, ``deepspeed``, ...) and every
    adapter name (built-in or entry point)."""
    from accelerate.utils import DistributedType

    names = {adapter_name_for(t) for t in DistributedType}
    return sorted(names | set(BUILTIN_ADAPTERS) | set(strategy_adapter_entry_points()))


def check_custom_strategy_adapters(custom_strategy_adapters: Mapping[Any, Any]) -> None:
    """Refuse a key that names no strategy: the adapter it maps would never be used."""
    known: list[str] | None = None
    for key, ref in custom_strategy_adapters.items():
        if not isinstance(key, str):
            raise StrategyAdapterError(
                f"custom_strategy_adapters: key {key!r} must be a strategy name string"
            )
        known = known or strategy_names()
        if key.strip() and adapter_name_for(key) in known:
            continue
        raise StrategyAdapterError(
            f"custom_strategy_adapters.{key}: unknown strategy {key!r} (mapped to {ref!r})"
            f"{suggestion(key.lower(), known)}; strategies: {', '.join(known)}, or an accelerate "
            "DistributedType value such as NO, MULTI_GPU or FSDP"
        )


def select_strategy_adapter(
    distributed_type: Any,
    custom_strategy_adapters: Mapping[str, str] | None = None,
    **adapter_cfg: Any,
) -> StrategyAdapter:
    """Instantiate the adapter for ``distributed_type``; ``custom_strategy_adapters`` wins."""
    return strategy_adapter_class(distributed_type, custom_strategy_adapters)(**adapter_cfg)


def has_strategy_adapter(
    distributed_type: Any, custom_strategy_adapters: Mapping[str, str] | None = None
) -> bool:
    """Whether an adapter (custom, built-in or entry point) exists for ``distributed_type``."""
    name = adapter_name_for(distributed_type)
    custom = {adapter_name_for(k) for k in (custom_strategy_adapters or {}) if isinstance(k, str)}
    return name in custom or name in BUILTIN_ADAPTERS or name in strategy_adapter_entry_points()


def strategy_adapter_class(
    distributed_type: Any, custom_strategy_adapters: Mapping[str, str] | None = None
) -> type[StrategyAdapter]:
    """The adapter class for ``distributed_type``; ``custom_strategy_adapters`` wins."""
    name = adapter_name_for(distributed_type)
    check_custom_strategy_adapters(custom_strategy_adapters or {})
    custom = {adapter_name_for(k): ref for k, ref in (custom_strategy_adapters or {}).items()}
    if name in custom:
        try:
            cls = resolve_strategy_adapter(custom[name])
        except StrategyAdapterError as exc:
            raise StrategyAdapterError(f"custom_strategy_adapters.{name}: {exc}") from exc
    elif name in BUILTIN_ADAPTERS:
        cls = resolve_strategy_adapter(name)
    else:
        eps = strategy_adapter_entry_points()
        if name not in eps:
            known = sorted({*BUILTIN_ADAPTERS, *eps})
            raise StrategyAdapterError(
                f"no strategy adapter for distributed type {name!r} (available: {known}); "
                f"write one and map it with custom_strategy_adapters: "
                f"{{{name}: 'package.module:MyAdapter'}}"
            )
        cls = resolve_strategy_adapter(name)
    return cls

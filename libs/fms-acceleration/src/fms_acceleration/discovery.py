"""Finding plugins: the entry-point group `fms_acceleration.plugins`, plus classes registered in
this process. A plugin that fails to import is kept as a record of why, so a configuration that
needs it can name it."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

from .constants import PLUGIN_GROUP
from .errors import PluginRegistrationError
from .framework_plugin import (
    AccelerationPlugin,
    PluginRegistration,
    active_registry,
    registration_of,
)
from .packages import BrokenEntryPoint, entry_points_of, load_entry_points


@dataclass(frozen=True)
class Catalogue:
    """The plugins a framework can activate, in registration order, and the broken ones."""

    registrations: tuple[PluginRegistration, ...]
    broken: tuple[BrokenEntryPoint, ...] = ()


def _registered_classes(obj: object) -> list[type[AccelerationPlugin]]:
    if isinstance(obj, type):
        return [obj] if registration_of(obj) else []
    if isinstance(obj, ModuleType):
        return [
            member
            for _, member in inspect.getmembers(obj, inspect.isclass)
            if issubclass(member, AccelerationPlugin) and registration_of(member)
        ]
    return []


def plugin_entry_points() -> Iterable[metadata.EntryPoint]:
    """The installed entry points of the plugin group (a seam for tests)."""
    return entry_points_of(PLUGIN_GROUP)


def plugin_catalogue(
    plugin_classes: Sequence[type[AccelerationPlugin]] | None = None,
) -> Catalogue:
    """Exactly `plugin_classes`, or every plugin from entry points and in-process registration."""
    if plugin_classes is not None:
        registrations = []
        for cls in plugin_classes:
            registration = registration_of(cls)
            if registration is None:
                raise PluginRegistrationError(
                    f"{cls.__name__} was never passed to AccelerationPlugin.register_plugin"
                )
            registrations.append(registration)
        return Catalogue(tuple(registrations))
    found: dict[type, PluginRegistration] = {}
    broken: list[BrokenEntryPoint] = []
    registry = active_registry()
    if registry.use_entry_points:
        loaded, broken = load_entry_points(plugin_entry_points())
        for entry in loaded:
            classes = _registered_classes(entry.obj)
            if not classes:
                broken.append(
                    BrokenEntryPoint(
                        entry.name,
                        entry.value,
                        entry.package,
                        entry.version,
                        "registers no AccelerationPlugin",
                    )
                )
            for cls in classes:
                found[cls] = registration_of(cls)  # type: ignore[assignment]
    for registration in registry.snapshot():
        found[registration.plugin_class] = registration
    ordered = sorted(found.values(), key=lambda r: r.sequence)
    for failure in broken:
        warnings.warn(f"fms-acceleration plugin {failure.describe()}", stacklevel=3)
    return Catalogue(tuple(ordered), tuple(broken))


def discover_plugins() -> list[PluginRegistration]:
    """Every plugin this process can activate; a broken one is a warning that names it."""
    return list(plugin_catalogue().registrations)


def known_stanza_paths() -> frozenset[str]:
    """Every stanza path a plugin here claims, and those of the reference's plugins."""
    from .catalogue import REFERENCE_STANZAS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken plugin is reported where it is used
        registrations = plugin_catalogue().registrations
    return frozenset(p for r in registrations for p in r.paths) | frozenset(REFERENCE_STANZAS)

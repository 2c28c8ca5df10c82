"""Finding installed plugins through the `fms_acceleration.plugins` entry-point group."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from types import MappingProxyType, ModuleType

from .plugin import AccelerationPlugin, PluginRegistration, registration_of

PLUGIN_GROUP = "fms_acceleration.plugins"
CLI_GROUP = "fms_acceleration.cli"

# Stanzas of plugins this project (or the reference project) publishes, so a config written for
# a plugin that is not installed gets "install X" rather than "unknown stanza". Names only: the
# framework never imports a plugin.
KNOWN_STANZAS = MappingProxyType(
    {
        "peft.quantization.bitsandbytes": "fms-acceleration-peft",
        "peft.quantization.auto_gptq": "fms-acceleration-peft[gptq]",
        "peft.quantization.fused_ops_and_kernels": "fms-acceleration-foak",
        "training.fused_ops_and_kernels": "fms-acceleration-foak",
        "training.finetuning_schedule": "fms-acceleration-fts",
        "training.attention_and_distributed_packing": "fms-acceleration-aadp",
        "training.moe.scattermoe": "fms-acceleration-moe",
        "training.odm": "fms-acceleration-odm",
    }
)


@dataclass(frozen=True)
class DiscoveredPlugin:
    """A registered plugin class and the distribution that provides it."""

    registration: PluginRegistration
    package: str
    version: str

    @property
    def plugin_id(self) -> str:
        return self.registration.plugin_id


def _registered_classes(obj: object) -> list[type[AccelerationPlugin]]:
    if isinstance(obj, type):
        return [obj] if registration_of(obj) else []
    if isinstance(obj, ModuleType):
        found = [
            member
            for _, member in inspect.getmembers(obj, inspect.isclass)
            if issubclass(member, AccelerationPlugin) and registration_of(member)
        ]
        return sorted(found, key=lambda c: c.__name__)
    return []


def _distribution_of(entry_point: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "<unknown>", "<unknown>"
    return dist.metadata["Name"], dist.version


def plugin_entry_points() -> Iterable[metadata.EntryPoint]:
    return metadata.entry_points(group=PLUGIN_GROUP)


def described(
    plugin_class: type[AccelerationPlugin], package: str, version: str
) -> DiscoveredPlugin:
    registration = registration_of(plugin_class)
    if registration is None:
        raise TypeError(f"{plugin_class.__name__} was never passed to register_plugin")
    return DiscoveredPlugin(registration, package, version)


def discover_plugins() -> list[DiscoveredPlugin]:
    """Every registered plugin class reachable from installed entry points.

    A plugin that fails to import is reported as a warning naming it, and skipped.
    """
    found: list[DiscoveredPlugin] = []
    seen: set[type] = set()
    for entry_point in plugin_entry_points():
        package, version = _distribution_of(entry_point)
        try:
            loaded = entry_point.load()
        except Exception as err:  # a broken plugin must never take the framework down
            warnings.warn(
                f"fms-acceleration plugin '{entry_point.name}' ({entry_point.value}) from "
                f"package '{package}' failed to import and is skipped: "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
            )
            continue
        classes = _registered_classes(loaded)
        if not classes:
            warnings.warn(
                f"fms-acceleration plugin entry point '{entry_point.name}' ({entry_point.value}) "
                f"from package '{package}' registers no AccelerationPlugin and is skipped",
                stacklevel=2,
            )
        for plugin_class in classes:
            if plugin_class not in seen:
                seen.add(plugin_class)
                found.append(described(plugin_class, package, version))
    return found

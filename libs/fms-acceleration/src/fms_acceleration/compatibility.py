"""Declared compatibility between active plugins: unique slots, requirements and run order."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import AccelerationPluginConfigError
from .plugin import MODEL_LOADER_SLOT, AccelerationPlugin


def run_order(plugins: Sequence[AccelerationPlugin]) -> list[AccelerationPlugin]:
    """Model loaders first, then by each class's declared `order`, ties broken by id."""
    return sorted(
        plugins,
        key=lambda p: (MODEL_LOADER_SLOT not in p.taken_slots(), type(p).order, p.plugin_id),
    )


def refuse_duplicate_ids(plugins: Sequence[AccelerationPlugin]) -> None:
    seen: dict[str, AccelerationPlugin] = {}
    for plugin in plugins:
        other = seen.get(plugin.plugin_id)
        if other is not None:
            raise AccelerationPluginConfigError(
                f"two active plugins share the id '{plugin.plugin_id}': "
                f"{type(other).__name__} and {type(plugin).__name__}; plugin ids must be unique."
            )
        seen[plugin.plugin_id] = plugin


def slot_owners(plugins: Sequence[AccelerationPlugin]) -> dict[str, AccelerationPlugin]:
    """Map each slot to the one plugin taking it; two plugins on one slot are refused."""
    owners: dict[str, AccelerationPlugin] = {}
    for plugin in plugins:
        for slot in sorted(plugin.taken_slots()):
            other = owners.get(slot)
            if other is not None:
                what = "both load the model" if slot == MODEL_LOADER_SLOT else "both take"
                raise AccelerationPluginConfigError(
                    f"plugins '{other.plugin_id}' and '{plugin.plugin_id}' {what} "
                    f"(slot '{slot}'); only one active plugin may hold a slot: remove one of "
                    "their stanzas."
                )
            owners[slot] = plugin
    return owners


def check_requirements(
    plugins: Sequence[AccelerationPlugin], owners: dict[str, AccelerationPlugin]
) -> None:
    """Every declared requirement must be met by another active plugin."""
    for plugin in plugins:
        for requirement in plugin.requirements():
            owner = owners.get(requirement.slot)
            if owner is None:
                raise AccelerationPluginConfigError(
                    f"plugin '{plugin.plugin_id}' requires {requirement.describe()}, but no "
                    f"active plugin takes the slot '{requirement.slot}'."
                )
            if requirement.providers and owner.plugin_id not in requirement.providers:
                raise AccelerationPluginConfigError(
                    f"plugin '{plugin.plugin_id}' requires {requirement.describe()}, but the slot "
                    f"'{requirement.slot}' is taken by '{owner.plugin_id}'."
                )

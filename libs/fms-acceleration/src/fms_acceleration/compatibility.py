"""Declared compatibility between active plugins: unique slots, requirements and run order."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PluginCombinationError
from .framework_plugin import MODEL_LOADER_SLOT, AccelerationPlugin, registration_of

DEFAULT_ORDER = 100


def _sequence(plugin: AccelerationPlugin) -> int:
    registration = plugin.__dict__.get("_registration") or registration_of(type(plugin))
    return registration.sequence if registration else 0


def run_order(plugins: Sequence[AccelerationPlugin]) -> list[AccelerationPlugin]:
    """Model loaders first, then by declared `order`; undeclared order and ties keep the
    registration order."""

    def key(plugin: AccelerationPlugin) -> tuple[bool, int, int]:
        order = type(plugin).order
        return (
            MODEL_LOADER_SLOT not in plugin.taken_slots(),
            DEFAULT_ORDER if order is None else order,
            _sequence(plugin),
        )

    return sorted(plugins, key=key)


def refuse_duplicate_ids(plugins: Sequence[AccelerationPlugin]) -> None:
    seen: dict[str, AccelerationPlugin] = {}
    for plugin in plugins:
        other = seen.get(plugin.plugin_id)
        if other is not None:
            raise PluginCombinationError(
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
                pair = f"plugins '{other.plugin_id}' and '{plugin.plugin_id}'"
                if slot == MODEL_LOADER_SLOT:
                    raise PluginCombinationError(
                        f"{pair} both load the model (slot '{slot}'). Can load at most 1 plugin "
                        "with custom model loading, but tried both; remove one of their stanzas."
                    )
                raise PluginCombinationError(
                    f"{pair} both take (slot '{slot}'); only one active plugin may hold a slot: "
                    "remove one of their stanzas."
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
                raise PluginCombinationError(
                    f"plugin '{plugin.plugin_id}' requires {requirement.describe()}, but no "
                    f"active plugin takes the slot '{requirement.slot}'."
                )
            if requirement.providers and not owner.is_one_of(requirement.providers):
                raise PluginCombinationError(
                    f"plugin '{plugin.plugin_id}' requires {requirement.describe()}, but the slot "
                    f"'{requirement.slot}' is taken by '{owner.plugin_id}'."
                )

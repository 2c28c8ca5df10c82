"""AccelerationFramework: reads one YAML, activates plugins and drives them around a Trainer."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .accelerator_patcher import AcceleratorPatcher
from .compatibility import check_requirements, refuse_duplicate_ids, run_order, slot_owners
from .config_file import read_configuration, resolve_configuration_source
from .discovery import DiscoveredPlugin, described, discover_plugins
from .errors import AccelerationFrameworkError, AccelerationPluginConfigError
from .model_patcher import ModelPatcher
from .plugin import MODEL_LOADER_SLOT, AccelerationPlugin
from .stanzas import validate_plugins_tree
from .summary import ready_for_train_table

logger = logging.getLogger("fms_acceleration")


def _model_architectures(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    archs = set(getattr(config, "architectures", None) or [])
    return archs | {type(base).__name__}


class AccelerationFramework:
    """Activates the plugins a configuration asks for and applies them in declared order."""

    def __init__(
        self,
        configuration_file: str | os.PathLike | Mapping | None = None,
        require_packages_check: bool = True,
        *,
        plugin_classes: Sequence[type[AccelerationPlugin]] | None = None,
    ) -> None:
        source = resolve_configuration_source(configuration_file)
        body, self.source = read_configuration(source)
        catalogue = (
            discover_plugins()
            if plugin_classes is None
            else [described(cls, "<local>", "<local>") for cls in plugin_classes]
        )
        try:
            validated = validate_plugins_tree(body, catalogue)
            self.configurations = validated.tree
            self.passed_through = dict(validated.passed_through)
            active = [
                (entry, entry.registration.plugin_class(validated.tree, require_packages_check))
                for entry in catalogue
                if entry.registration.is_activated_by(set(validated.present))
            ]
            plugins = [plugin for _, plugin in active]
            refuse_duplicate_ids(plugins)
            owners = slot_owners(plugins)
            check_requirements(plugins, owners)
        except AccelerationPluginConfigError as err:
            raise AccelerationPluginConfigError(f"{self.source}: {err}") from None
        self._catalogue = {plugin.plugin_id: entry for entry, plugin in active}
        self._ordered = run_order(plugins)
        self._slot_owners = MappingProxyType(owners)
        self.model_patcher = ModelPatcher()
        self.accelerator_patcher = AcceleratorPatcher()
        for plugin in self._ordered:
            plugin.model_patcher = self.model_patcher
            plugin.accelerator_patcher = self.accelerator_patcher

    # --- what a client asks -------------------------------------------------------------------

    @property
    def active_plugins(self) -> list[tuple[str, AccelerationPlugin]]:
        """(plugin id, instance) in run order (fms-acceleration compatible)."""
        return [(p.plugin_id, p) for p in self._ordered]

    @property
    def plugins(self) -> Mapping[str, AccelerationPlugin]:
        """Active plugin instances by id."""
        return MappingProxyType({p.plugin_id: p for p in self._ordered})

    @property
    def slot_owners(self) -> Mapping[str, str]:
        """Which plugin id holds each slot."""
        return MappingProxyType({slot: p.plugin_id for slot, p in self._slot_owners.items()})

    @property
    def requires_custom_loading(self) -> bool:
        return MODEL_LOADER_SLOT in self._slot_owners

    @property
    def requires_augmentation(self) -> bool:
        return any(p.requires_augmentation for p in self._ordered)

    def model_loader(self, model_name: str, **kwargs: Any) -> Any:
        """Load the model through the one plugin holding the model_loader slot."""
        loader = self._slot_owners.get(MODEL_LOADER_SLOT)
        if loader is None:
            raise AccelerationFrameworkError(
                "no active plugin loads models (requires_custom_loading is False); load the "
                "model yourself, e.g. AutoModelForCausalLM.from_pretrained(...)"
            )
        return loader.model_loader(model_name, **kwargs)

    def augmentation(
        self, model: Any, train_args: Any, modifiable_args: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...]]:
        """Let each plugin modify the model and the modifiable args, then apply model patches."""
        if not isinstance(modifiable_args, tuple):
            raise AccelerationFrameworkError(
                f"modifiable_args must be a tuple, got {type(modifiable_args).__name__}"
            )
        for plugin in self._ordered:
            if not plugin.requires_augmentation:
                continue
            self._check_architecture(plugin, model)
            model, returned = plugin.augmentation(model, train_args, modifiable_args)
            if not isinstance(returned, tuple) or len(returned) != len(modifiable_args):
                raise AccelerationFrameworkError(
                    f"plugin '{plugin.plugin_id}' returned modifiable_args {returned!r}; expected "
                    f"a tuple of {len(modifiable_args)} item(s)"
                )
            modifiable_args = returned
        self.model_patcher.patch(model)
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(self, model: Any = None, accelerator: Any = None) -> list:
        """Collect every plugin's callbacks, install accelerator patches, log the summary."""
        callbacks: list = []
        for plugin in self._ordered:
            callbacks.extend(plugin.get_callbacks_and_ready_for_train(model, accelerator))
        if model is not None:
            self.model_patcher.patch(model)
        if accelerator is not None:
            self.accelerator_patcher.install(accelerator)
        logger.info("\n%s", self.summary())
        return callbacks

    def undo_patches(self) -> None:
        """Revert every model and accelerator patch the plugins applied."""
        self.model_patcher.undo()
        self.accelerator_patcher.undo()

    def summary(self) -> str:
        """The ready-for-train table: plugins, versions, slots, applied patches."""
        plugin_rows = []
        for index, plugin in enumerate(self._ordered, start=1):
            entry: DiscoveredPlugin = self._catalogue[plugin.plugin_id]
            plugin_rows.append(
                (
                    str(index),
                    plugin.plugin_id,
                    entry.package,
                    entry.version,
                    ", ".join(sorted(plugin.taken_slots())) or "-",
                    ", ".join(entry.registration.paths),
                )
            )
        counts: dict[tuple[str, str], list[str]] = {}
        for record in self.model_patcher.history:
            counts.setdefault((record.rule_id, record.kind), []).append(record.target)
        for arecord in self.accelerator_patcher.history:
            counts.setdefault((arecord.rule_id, arecord.target), []).append(arecord.description)
        for rule in self.accelerator_patcher.rules:
            counts.setdefault((rule.rule_id, rule.target), [])
        patch_rows = [
            (rule_id, kind, str(len(targets)), _abbreviate(targets))
            for (rule_id, kind), targets in counts.items()
        ]
        return ready_for_train_table(plugin_rows, patch_rows, sorted(self.passed_through))

    def _check_architecture(self, plugin: AccelerationPlugin, model: Any) -> None:
        restricted = type(plugin).restricted_model_archs
        if restricted is None:
            return
        archs = _model_architectures(model)
        if not archs & set(restricted):
            raise AccelerationPluginConfigError(
                f"plugin '{plugin.plugin_id}' does not support the model architecture "
                f"{', '.join(sorted(archs))}; supported: {', '.join(sorted(restricted))}."
            )


def _abbreviate(targets: list[str], limit: int = 2) -> str:
    if not targets:
        return "(at accelerator.prepare)"
    shown = ", ".join(targets[:limit])
    return shown + (f", ... (+{len(targets) - limit})" if len(targets) > limit else "")

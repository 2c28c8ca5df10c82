"""fms-acceleration: one YAML file turns on acceleration plugins around a HF Trainer."""

from .accelerator_patcher import AcceleratorPatcher, AcceleratorPatcherComponent
from .constants import PLUGIN_PREFIX
from .errors import (
    AccelerationFrameworkError,
    AccelerationPluginConfigError,
    NoPluginsConfiguredError,
    PatchError,
    PatchNotInEffectError,
    PluginImportError,
)
from .framework import AccelerationFramework
from .framework_plugin import (
    AccelerationPlugin,
    PluginRegistration,
    Requirement,
    get_relevant_configuration_sections,
)
from .model_patcher import ModelPatcher, ModelPatcherRule, ModelPatcherTrigger
from .trainer_patcher import TrainerPatcher
from .validation import Choice, StanzaModel, validate_model


def __getattr__(name: str) -> object:
    if name == "PLUGINS":  # derived when read (see constants.py)
        from . import constants

        return constants.PLUGINS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PLUGINS",
    "PLUGIN_PREFIX",
    "AccelerationFramework",
    "AccelerationFrameworkError",
    "AccelerationPlugin",
    "AccelerationPluginConfigError",
    "AcceleratorPatcher",
    "AcceleratorPatcherComponent",
    "Choice",
    "ModelPatcher",
    "ModelPatcherRule",
    "ModelPatcherTrigger",
    "NoPluginsConfiguredError",
    "PatchError",
    "PatchNotInEffectError",
    "PluginImportError",
    "PluginRegistration",
    "Requirement",
    "StanzaModel",
    "TrainerPatcher",
    "get_relevant_configuration_sections",
    "validate_model",
]

"""fms-acceleration: one YAML file turns on acceleration plugins around a HF Trainer."""

from .accelerator_patcher import AcceleratorPatcher
from .errors import AccelerationFrameworkError, AccelerationPluginConfigError, PatchError
from .framework import AccelerationFramework
from .model_patcher import ModelPatcher, ModelPatcherRule, ModelPatcherTrigger
from .plugin import AccelerationPlugin, PluginRegistration, Requirement
from .schema import Option, Stanza

__all__ = [
    "AccelerationFramework",
    "AccelerationFrameworkError",
    "AccelerationPlugin",
    "AccelerationPluginConfigError",
    "AcceleratorPatcher",
    "ModelPatcher",
    "ModelPatcherRule",
    "ModelPatcherTrigger",
    "Option",
    "PatchError",
    "PluginRegistration",
    "Requirement",
    "Stanza",
]

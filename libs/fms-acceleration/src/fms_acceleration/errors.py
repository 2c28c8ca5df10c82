"""Exception types of the framework: every user-facing error is one of these.

Where the reference fms-acceleration raised a builtin (``assert`` statements, ``ValueError``,
``NotImplementedError``, ``AttributeError``), the matching error here also subclasses that
builtin, so clients that catch it keep working; unlike ``assert``, these survive ``python -O``.
"""

from __future__ import annotations


class AccelerationPluginConfigError(ValueError):
    """A configuration (YAML file, stanza, plugin combination) cannot be used as written."""


class AccelerationFrameworkError(RuntimeError):
    """The framework was driven in a way its plugins cannot serve (e.g. no model loader)."""


class PatchError(ValueError, AssertionError):
    """A model or accelerator patch rule is malformed or cannot be applied."""


class PatchTypeError(PatchError, TypeError):
    """A patch rule was given an object of the wrong kind (e.g. a trigger that is not callable)."""


class PluginRegistrationError(TypeError, AssertionError):
    """`AccelerationPlugin.register_plugin` was called with arguments it cannot use."""


class PluginCombinationError(AccelerationPluginConfigError, AssertionError):
    """Two active plugins claim one slot, or a plugin's requirement is unmet."""


class NoPluginsConfiguredError(AccelerationPluginConfigError):
    """The configuration activates no plugin (the reference's "No plugins could be configured")."""


class PluginHookMissingError(AccelerationFrameworkError, NotImplementedError):
    """A hook was called that no active plugin implements (e.g. model_loader without a loader)."""


class ModelWithoutConfigError(AccelerationFrameworkError, AttributeError):
    """`augmentation` was given a model without a `config` (not a transformers model)."""


class PluginImportError(AccelerationPluginConfigError):
    """The configuration needs a plugin that is installed but fails to import."""


class PatchNotInEffectError(AccelerationFrameworkError):
    """A patch was applied but the model will not call it (the library routes around it)."""

"""Exception types of the framework: every user-facing error is one of these."""

from __future__ import annotations


class AccelerationPluginConfigError(ValueError):
    """A configuration (YAML file, stanza, plugin combination) cannot be used as written."""


class AccelerationFrameworkError(RuntimeError):
    """The framework was driven in a way its plugins cannot serve (e.g. no model loader)."""


class PatchError(RuntimeError):
    """A model or accelerator patch rule is malformed or cannot be applied."""

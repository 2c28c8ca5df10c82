"""Errors of the accelerated-moe plugin beyond the framework's own."""

from __future__ import annotations

from fms_acceleration import AccelerationPluginConfigError

STANZA = "plugins.training.moe.scattermoe"
"""the stanza every error of this plugin names"""


class CheckpointLayoutError(AccelerationPluginConfigError, AssertionError):
    """A checkpoint (or its weight map) does not have the layout the conversion expects.

    Also an AssertionError: the reference raised asserts for some of these cases."""

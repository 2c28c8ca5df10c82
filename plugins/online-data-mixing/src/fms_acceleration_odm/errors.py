"""Errors of the online-data-mixing plugin: each names the key or argument and the value.

They subclass the core's AccelerationPluginConfigError (a ValueError); where the reference
raised AssertionError or NotImplementedError for the same input, ours also subclass those, so
code written against the reference still catches them.
"""

from __future__ import annotations

from fms_acceleration import AccelerationPluginConfigError


class ODMConfigError(AccelerationPluginConfigError):
    """An OnlineMixingDataset argument or a `training.odm.odm` option cannot be used."""


class AutoCategorizeInputError(ODMConfigError, AssertionError):
    """Auto-categorisation lacks what it needs (e.g. a tokenizer to turn token ids into text)."""


class UnsupportedDatasetError(ODMConfigError, NotImplementedError):
    """A dataset of a kind the mixer cannot use where it is given (e.g. an IterableDataset
    where auto-categorisation needs a sized one)."""

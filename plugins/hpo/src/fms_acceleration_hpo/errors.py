"""Errors of the search: bad input (options, storage URL, search space use) named by flag or key."""

from __future__ import annotations

from fms_acceleration import AccelerationPluginConfigError


class SearchError(AccelerationPluginConfigError):
    """The search cannot run as asked (a flag, the storage, the study, the search space)."""

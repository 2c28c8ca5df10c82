"""Names shared with the reference fms-acceleration and with every plugin package."""

from __future__ import annotations

from typing import Any

KEY_PLUGINS = "plugins"
PLUGIN_PREFIX = "fms_acceleration_"
ACCELERATION_FRAMEWORK_ENV_KEY = "ACCELERATION_FRAMEWORK_CONFIG_FILE"

PLUGIN_GROUP = "fms_acceleration.plugins"
CLI_GROUP = "fms_acceleration.cli"
STRATEGY_ADAPTER_GROUP = "fms_acceleration.strategy_adapters"


def __getattr__(name: str) -> Any:
    # PLUGINS: the reference's list of installable short names (fms_acceleration_<name>), here
    # derived from the installed plugins and the reference's (catalogue.py), never hand-kept
    if name == "PLUGINS":
        from .catalogue import plugin_short_names

        return plugin_short_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Names shared with the reference fms-acceleration and with every plugin package."""

from __future__ import annotations

KEY_PLUGINS = "plugins"
PLUGIN_PREFIX = "fms_acceleration_"
ACCELERATION_FRAMEWORK_ENV_KEY = "ACCELERATION_FRAMEWORK_CONFIG_FILE"

# Short names of the plugin modules (fms_acceleration_<name>), as the reference lists them.
# Discovery does not use this list: plugins are found through the entry-point group below.
PLUGINS = ("peft", "foak", "aadp", "moe", "odm", "mcp", "fts", "hpo")

PLUGIN_GROUP = "fms_acceleration.plugins"
CLI_GROUP = "fms_acceleration.cli"
STRATEGY_ADAPTER_GROUP = "fms_acceleration.strategy_adapters"

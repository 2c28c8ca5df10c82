"""Reading the acceleration configuration: a YAML file, a dict, or the file named by the
environment variable; the body of its one top-level key, `plugins:`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .constants import ACCELERATION_FRAMEWORK_ENV_KEY, KEY_PLUGINS
from .errors import AccelerationPluginConfigError
from .validation import suggestion
from .yaml_loading import read_yaml_file

CONFIG_ENV_VAR = ACCELERATION_FRAMEWORK_ENV_KEY
TOP_LEVEL_KEY = KEY_PLUGINS
DICT_SOURCE = "<dict configuration>"


def resolve_configuration_source(
    configuration: str | os.PathLike | Mapping | None,
) -> str | os.PathLike | Mapping:
    """The explicit configuration, else the file named by the environment variable."""
    if configuration is not None:
        return configuration
    from_env = os.environ.get(CONFIG_ENV_VAR)
    if not from_env:
        raise AccelerationPluginConfigError(
            f"no acceleration configuration given: pass configuration_file or set {CONFIG_ENV_VAR}."
        )
    return from_env


def read_configuration(configuration: str | os.PathLike | Mapping) -> tuple[dict, str]:
    """Return the body of `plugins:` and a label naming where it came from."""
    if isinstance(configuration, Mapping):
        return _plugins_body(configuration, DICT_SOURCE), DICT_SOURCE
    label = str(Path(configuration))
    document = read_yaml_file(configuration, "configuration")
    if document is None:
        raise AccelerationPluginConfigError(
            f"{label}: the file is empty; expected a top-level '{TOP_LEVEL_KEY}:' mapping."
        )
    return _plugins_body(document, label), label


def _plugins_body(document: Any, label: str) -> dict:
    if not isinstance(document, Mapping):
        raise AccelerationPluginConfigError(
            f"{label}: expected a mapping with a top-level '{TOP_LEVEL_KEY}:' key, "
            f"got {type(document).__name__}."
        )
    for key in document:
        if key != TOP_LEVEL_KEY:
            raise AccelerationPluginConfigError(
                f"{label}: unknown top-level key '{key}'{suggestion(str(key), [TOP_LEVEL_KEY])}; "
                f"the only top-level key is '{TOP_LEVEL_KEY}'."
            )
    if TOP_LEVEL_KEY not in document:
        raise AccelerationPluginConfigError(f"{label}: missing top-level '{TOP_LEVEL_KEY}:' key.")
    body = document[TOP_LEVEL_KEY]
    if body is None:
        raise AccelerationPluginConfigError(
            f"{label}: '{TOP_LEVEL_KEY}:' has no body; add at least one plugin stanza under it "
            f"(see `fms-acceleration configs`)."
        )
    if not isinstance(body, Mapping):
        raise AccelerationPluginConfigError(
            f"{label}: '{TOP_LEVEL_KEY}' must be a mapping of stanzas, got {type(body).__name__}."
        )
    return dict(body)

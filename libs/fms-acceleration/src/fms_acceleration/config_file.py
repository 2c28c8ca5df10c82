"""Reading the acceleration configuration: a YAML file, a dict, or the file named by the
environment variable; the body of its top-level key `plugins:`, and the framework's own
top-level option `strict:` (whether a patch that does not take effect stops the run)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import ACCELERATION_FRAMEWORK_ENV_KEY, KEY_PLUGINS
from .errors import AccelerationPluginConfigError
from .validation import suggestion
from .yaml_loading import read_yaml_file

CONFIG_ENV_VAR = ACCELERATION_FRAMEWORK_ENV_KEY
TOP_LEVEL_KEY = KEY_PLUGINS
STRICT_KEY = "strict"
DICT_SOURCE = "<dict configuration>"


@dataclass(frozen=True)
class Configuration:
    """What a configuration says: its plugin stanzas and the framework's own options."""

    plugins: dict
    source: str  # where it came from, for messages
    strict: bool = True  # a patch that does not take effect is an error (else a warning)


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


def load_configuration(configuration: str | os.PathLike | Mapping) -> Configuration:
    """Read and check the top level of a configuration (a file path or a mapping)."""
    if isinstance(configuration, Mapping):
        return _parse(configuration, DICT_SOURCE)
    label = str(Path(configuration))
    document = read_yaml_file(configuration, "configuration")
    if document is None:
        raise AccelerationPluginConfigError(
            f"{label}: the file is empty; expected a top-level '{TOP_LEVEL_KEY}:' mapping."
        )
    return _parse(document, label)


def read_configuration(configuration: str | os.PathLike | Mapping) -> tuple[dict, str]:
    """Return the body of `plugins:` and a label naming where it came from."""
    loaded = load_configuration(configuration)
    return loaded.plugins, loaded.source


def _parse(document: Any, label: str) -> Configuration:
    if not isinstance(document, Mapping):
        raise AccelerationPluginConfigError(
            f"{label}: expected a mapping with a top-level '{TOP_LEVEL_KEY}:' key, "
            f"got {type(document).__name__}."
        )
    known = [TOP_LEVEL_KEY, STRICT_KEY]
    for key in document:
        if key not in known:
            raise AccelerationPluginConfigError(
                f"{label}: unknown top-level key '{key}'{suggestion(str(key), known)}; "
                f"the top-level keys are '{TOP_LEVEL_KEY}' and '{STRICT_KEY}'."
            )
    strict = document.get(STRICT_KEY, True)
    if not isinstance(strict, bool):
        raise AccelerationPluginConfigError(
            f"{label}: '{STRICT_KEY}: {strict!r}' must be true or false (whether a patch that "
            "does not take effect stops the run)."
        )
    return Configuration(_plugins_body(document, label), label, strict)


def _plugins_body(document: Mapping, label: str) -> dict:
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

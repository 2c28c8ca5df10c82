"""Reading the acceleration YAML file: strict about duplicates, empty files and bad syntax."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import AccelerationPluginConfigError
from .schema import suggestion

CONFIG_ENV_VAR = "ACCELERATION_FRAMEWORK_CONFIG_FILE"
TOP_LEVEL_KEY = "plugins"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise AccelerationPluginConfigError(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1} "
                f"(first defined at line {first})."
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text, turning every parse problem into a config error naming `source`."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # _StrictLoader is a SafeLoader
    except AccelerationPluginConfigError as err:
        raise AccelerationPluginConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise AccelerationPluginConfigError(
            f"{source}: YAML syntax error{where}: {problem}."
        ) from None


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
        return _plugins_body(configuration, "<dict configuration>"), "<dict configuration>"
    path = Path(configuration)
    label = str(path)
    if not path.is_file():
        raise AccelerationPluginConfigError(f"{label}: configuration file does not exist.")
    text = path.read_text(encoding="utf-8")
    document = load_yaml(text, label)
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

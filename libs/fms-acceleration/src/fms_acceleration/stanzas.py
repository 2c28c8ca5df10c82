"""Validating the `plugins:` tree against the schemas that discovered plugins declare."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .discovery import KNOWN_STANZAS, DiscoveredPlugin
from .errors import AccelerationPluginConfigError
from .schema import Stanza, suggestion


@dataclass(frozen=True)
class ValidatedPlugins:
    """The validated `plugins:` tree, the stanza paths present, and those passed through."""

    tree: dict[str, Any]
    present: frozenset[str]
    passed_through: Mapping[str, str]  # stanza path -> package to install


def collect_schemas(catalogue: Sequence[DiscoveredPlugin]) -> dict[str, tuple[Stanza, str]]:
    """Stanza path -> (schema, declaring plugin id); conflicting declarations are refused."""
    schemas: dict[str, tuple[Stanza, str]] = {}
    for plugin in catalogue:
        for path, schema in plugin.registration.schemas.items():
            if path in schemas and schemas[path][0] != schema:
                other = schemas[path][1]
                raise AccelerationPluginConfigError(
                    f"plugins '{other}' and '{plugin.plugin_id}' declare different schemas for "
                    f"the stanza 'plugins.{path}'"
                )
            schemas.setdefault(path, (schema, plugin.plugin_id))
    return schemas


def _set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def validate_plugins_tree(
    body: Mapping[str, Any], catalogue: Sequence[DiscoveredPlugin]
) -> ValidatedPlugins:
    """Validate every stanza under `plugins:`; unknown stanzas are errors, uninstalled known
    ones are kept as written with a warning naming the package to install."""
    schemas = {path: spec for path, (spec, _) in collect_schemas(catalogue).items()}
    known = set(schemas) | set(KNOWN_STANZAS)
    tree: dict[str, Any] = {}
    present: set[str] = set()
    passed: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in schemas:
                _set_path(tree, path, schemas[path].validate(value, f"plugins.{path}"))
                present.add(path)
            elif path in KNOWN_STANZAS:
                package = KNOWN_STANZAS[path]
                warnings.warn(
                    f"plugins.{path}: this stanza belongs to the package '{package}', which is "
                    f"not installed; it is passed through unused (pip install {package})",
                    stacklevel=3,
                )
                _set_path(tree, path, value)
                passed[path] = package
            elif any(k.startswith(path + ".") for k in known):
                if not isinstance(value, Mapping):
                    raise AccelerationPluginConfigError(
                        f"plugins.{path}: expected a mapping of stanzas, got "
                        f"{type(value).__name__} {value!r}."
                    )
                walk(value, path + ".")
            else:
                siblings = sorted(
                    {k[len(prefix) :].split(".")[0] for k in known if k.startswith(prefix)}
                )
                raise AccelerationPluginConfigError(
                    f"plugins.{path}: unknown stanza '{key}'{suggestion(str(key), siblings)}; "
                    f"known here: {', '.join(siblings) or 'none'}."
                )

    walk(body, "")
    return ValidatedPlugins(tree, frozenset(present), passed)

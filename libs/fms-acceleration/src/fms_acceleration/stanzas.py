"""Validating the `plugins:` tree: each stanza against its plugin's schema, unknown stanzas
named with a close match, and stanzas of known but uninstalled (or broken) plugins explained."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel

from .catalogue import REFERENCE_STANZAS
from .dotted_paths import lookup, set_at
from .errors import AccelerationPluginConfigError, PluginImportError
from .framework_plugin import PluginRegistration
from .packages import BrokenEntryPoint, installed_version
from .validation import suggestion, validate_model

# stanza path -> the package to install for it, when no installed plugin claims it
KNOWN_STANZAS: Mapping[str, str] = REFERENCE_STANZAS


@dataclass(frozen=True)
class ValidatedPlugins:
    """The validated `plugins:` tree and what was found in it."""

    tree: dict[str, Any]
    present: frozenset[str]  # stanza paths a plugin claims and the user wrote
    passed_through: Mapping[str, str]  # stanza path -> package to install
    unknown: tuple[str, ...]  # one message per stanza no registered plugin claims


def collect_schemas(
    registrations: Sequence[PluginRegistration],
) -> dict[str, tuple[type[BaseModel] | None, str]]:
    """Stanza path -> (schema or None for a schema-less plugin, declaring plugin id)."""
    schemas: dict[str, tuple[type[BaseModel] | None, str]] = {}
    for registration in registrations:
        for path in registration.paths:
            schema = registration.schemas.get(path)
            if path in schemas and schemas[path][0] is not schema:
                first, other = schemas[path]
                if first is not None and schema is not None:
                    raise AccelerationPluginConfigError(
                        f"plugins '{other}' and '{registration.plugin_id}' declare different "
                        f"schemas for the stanza 'plugins.{path}'"
                    )
                if first is None:
                    schemas[path] = (schema, registration.plugin_id)
                continue
            schemas.setdefault(path, (schema, registration.plugin_id))
    return schemas


def _broken_plugin_error(
    path: str, package: str, broken: Sequence[BrokenEntryPoint]
) -> PluginImportError | None:
    """The stanza's plugin is installed but failed to import: say why (never ignored)."""
    failures = [b for b in broken if b.package.lower() == package.lower()]
    if not failures:
        return None
    return PluginImportError(
        f"plugins.{path}: the plugin for this stanza is installed but failed to import: "
        f"plugin {failures[0].describe()}. Fix or reinstall {package}; training "
        "without it would silently ignore this stanza."
    )


def validate_plugins_tree(
    body: Mapping[str, Any],
    registrations: Sequence[PluginRegistration],
    broken: Sequence[BrokenEntryPoint] = (),
) -> ValidatedPlugins:
    """Validate every stanza under `plugins:`; report unknown stanzas; keep uninstalled known
    ones as written, with a warning naming the package to install."""
    schemas = collect_schemas(registrations)
    # the plugin class each stanza's schema belongs to, named in errors as the reference did
    owners = {p: r.plugin_class.__name__ for r in reversed(registrations) for p in r.schemas}
    tree: dict[str, Any] = {}
    present: set[str] = set()
    for path in sorted(schemas):
        found, value = lookup(body, path)
        schema = schemas[path][0]
        if not found or (schema is None and value is None):
            continue  # a schema-less stanza with no body is absent, as in the reference
        if schema is not None:
            owner = owners.get(path)
            value = validate_model(schema, value, f"plugins.{path}", owner=owner).model_dump()
        else:
            value = copy.deepcopy(value)  # the plugin may change it; the user's dict stays
        set_at(tree, path, value)
        present.add(path)

    known_paths = set(schemas) | set(KNOWN_STANZAS)
    passed: dict[str, str] = {}
    unknown: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in schemas:
                continue
            if path in KNOWN_STANZAS:
                package = KNOWN_STANZAS[path]
                error = _broken_plugin_error(path, package, broken)
                if error is not None:
                    raise error
                if installed_version(package) is not None:
                    # installed, yet no plugin registered here claims it (e.g. a client's test
                    # that registers only some plugins): unclaimed, as the reference ignores it
                    unknown.append(
                        f"plugins.{path}: no registered plugin claims this stanza (its package "
                        f"'{package}' is installed but registers no plugin for it here)."
                    )
                    continue
                warnings.warn(
                    f"plugins.{path}: this stanza belongs to the package '{package}', "
                    f"which is not installed; it is passed through unused "
                    f"(pip install {package})",
                    stacklevel=4,
                )
                set_at(tree, path, value)
                passed[path] = package
                continue
            below = sorted(
                {k[len(path) + 1 :].split(".")[0] for k in known_paths if k.startswith(path + ".")}
            )
            if below:
                if not isinstance(value, Mapping) or not value:
                    got = "nothing" if not value else f"{type(value).__name__} {value!r}"
                    raise AccelerationPluginConfigError(
                        f"plugins.{path}: expected a mapping with one or more of the stanzas "
                        f"{', '.join(below)}; got {got}."
                    )
                walk(value, path + ".")
                continue
            siblings = sorted(
                {k[len(prefix) :].split(".")[0] for k in known_paths if k.startswith(prefix)}
            )
            message = (
                f"plugins.{path}: unknown stanza '{key}'{suggestion(str(key), siblings)}; "
                f"known here: {', '.join(siblings) or 'none'}."
            )
            if broken:
                message += (
                    " Note: "
                    + "; ".join(f"plugin {b.describe()}" for b in broken)
                    + " (it may be the plugin for this stanza)."
                )
            unknown.append(message)

    walk(body, "")
    return ValidatedPlugins(tree, frozenset(present), MappingProxyType(passed), tuple(unknown))

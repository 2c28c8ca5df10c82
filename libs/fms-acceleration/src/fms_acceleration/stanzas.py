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

from .dotted_paths import lookup, set_at
from .errors import AccelerationPluginConfigError, PluginImportError
from .framework_plugin import PluginRegistration
from .packages import BrokenEntryPoint, installed_version
from .validation import suggestion, validate_model


@dataclass(frozen=True)
class KnownStanza:
    """A stanza of a plugin package published by this project or the reference project."""

    package: str  # the distribution that provides it
    install: str  # what to pip install


def _known(package: str, extra: str = "") -> KnownStanza:
    return KnownStanza(package, f"{package}{extra}")


# Names only: the framework never imports a plugin to learn its stanzas.
KNOWN_STANZAS: Mapping[str, KnownStanza] = MappingProxyType(
    {
        "peft.quantization.bitsandbytes": _known("fms-acceleration-peft"),
        "peft.quantization.auto_gptq": _known("fms-acceleration-peft", "[gptq]"),
        "peft.quantization.fused_ops_and_kernels": _known("fms-acceleration-foak"),
        "training.fused_ops_and_kernels": _known("fms-acceleration-foak"),
        "training.finetuning_schedule": _known("fms-acceleration-fts"),
        "training.attention.padding_free": _known("fms-acceleration-aadp"),
        "training.dataloader.multipack": _known("fms-acceleration-aadp"),
        "training.hpo": _known("fms-acceleration-hpo"),
        "training.moe.scattermoe": _known("fms-acceleration-moe"),
        "training.odm.odm": _known("fms-acceleration-odm"),
        "training.mamba.cp": _known("fms-acceleration-mcp"),
    }
)


@dataclass(frozen=True)
class ValidatedPlugins:
    """The validated `plugins:` tree and what was found in it."""

    tree: dict[str, Any]
    present: frozenset[str]  # stanza paths a plugin claims and the user wrote
    passed_through: Mapping[str, str]  # stanza path -> package to install
    unknown: tuple[str, ...]  # one message per stanza nobody knows


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


def _missing_plugin_error(
    path: str, known: KnownStanza, broken: Sequence[BrokenEntryPoint]
) -> PluginImportError | None:
    """The stanza's package is installed, so its plugin should have loaded: say why it did not."""
    if installed_version(known.package) is None:
        return None
    failures = [b for b in broken if b.package.lower() == known.package.lower()]
    if failures:
        return PluginImportError(
            f"plugins.{path}: the plugin for this stanza is installed but failed to import: "
            f"plugin {failures[0].describe()}. Fix or reinstall {known.install}; training "
            "without it would silently ignore this stanza."
        )
    return PluginImportError(
        f"plugins.{path}: the package '{known.package}' is installed but registers no plugin for "
        f"this stanza; reinstall it (pip install --force-reinstall {known.install})."
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
                known = KNOWN_STANZAS[path]
                error = _missing_plugin_error(path, known, broken)
                if error is not None:
                    raise error
                warnings.warn(
                    f"plugins.{path}: this stanza belongs to the package '{known.package}', "
                    f"which is not installed; it is passed through unused "
                    f"(pip install {known.install})",
                    stacklevel=4,
                )
                set_at(tree, path, value)
                passed[path] = known.install
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

"""Declarative schemas for plugin stanzas, with errors that name the dotted path."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import AccelerationPluginConfigError


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()

_TYPE_NAMES = {
    bool: "a boolean (true/false)",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _show(value: Any) -> str:
    """Render a value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def close_match(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to `word`, if any is close enough to be a likely typo."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def suggestion(word: str, candidates: list[str]) -> str:
    """A ' (did you mean X?)' suffix for an error message, or ''."""
    match = close_match(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def _same_value(a: Any, b: Any) -> bool:
    # `True == 1` in Python; a YAML `1` must not satisfy a `true` choice.
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class Option:
    """One key of a stanza: its type(s), default, allowed values and an optional custom check."""

    type: type | tuple[type, ...]
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    doc: str = ""
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None

    @property
    def types(self) -> tuple[type, ...]:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, path: str) -> Any:
        """Return the validated (possibly coerced) value or raise naming `path`."""
        if value is None and self.nullable:
            return None
        value = self._check_type(value, path)
        if self.choices is not None and not any(_same_value(value, c) for c in self.choices):
            allowed = ", ".join(_show(c) for c in self.choices)
            hint = suggestion(str(value), [str(c) for c in self.choices])
            raise AccelerationPluginConfigError(
                f"{path}: {_show(value)} is not an allowed value{hint}; allowed: {allowed}."
            )
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise AccelerationPluginConfigError(f"{path}: {_show(value)} {problem}")
        return value

    def _check_type(self, value: Any, path: str) -> Any:
        types = self.types
        if isinstance(value, bool):
            if bool in types:
                return value
        elif isinstance(value, int) and int not in types and float in types:
            return float(value)
        elif isinstance(value, tuple(t for t in types if t is not bool)):
            return value
        raise AccelerationPluginConfigError(
            f"{path}: expected {_type_name(types)}, got {type(value).__name__} {_show(value)}."
        )


class Stanza:
    """A mapping of named options (or nested stanzas) that a plugin accepts under one path."""

    def __init__(
        self,
        fields: Mapping[str, Option | Stanza] | None = None,
        /,
        *,
        doc: str = "",
        **options: Option | Stanza,
    ) -> None:
        merged = {**(fields or {}), **options}
        for key, spec in merged.items():
            if not isinstance(spec, (Option, Stanza)):
                raise TypeError(f"schema entry {key!r} must be an Option or a Stanza, got {spec!r}")
        self.fields: dict[str, Option | Stanza] = merged
        self.doc = doc

    def __repr__(self) -> str:
        return f"Stanza({', '.join(self.fields)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stanza) and self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]

    def validate(self, value: Any, path: str) -> dict[str, Any]:
        """Validate a stanza body; return it with defaults filled in."""
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise AccelerationPluginConfigError(
                f"{path}: expected a mapping of options, got {type(value).__name__} {_show(value)}."
            )
        allowed = sorted(self.fields)
        for key in value:
            if key not in self.fields:
                raise AccelerationPluginConfigError(
                    f"{path}.{key}: unknown key '{key}'{suggestion(str(key), allowed)}; "
                    f"allowed keys: {', '.join(allowed)}."
                )
        result: dict[str, Any] = {}
        for key, spec in self.fields.items():
            sub_path = f"{path}.{key}"
            if key in value:
                result[key] = spec.validate(value[key], sub_path)
            elif isinstance(spec, Stanza):
                result[key] = None
            elif spec.required:
                raise AccelerationPluginConfigError(f"{sub_path}: required key is missing.")
            else:
                # a fresh copy, so a mutable default is never shared between frameworks
                result[key] = copy.deepcopy(spec.default)
        return result

"""Command-line flags generated from pydantic models: an option is declared once, as a field.

A field of a `FlagModel` is the flag `--` + its name with dashes; its type gives the argparse
type (an int, a float, a string, a choice, a boolean switch, a list of values), its default the
default, and its docstring the help. `Flag(...)` in the field's `Annotated` metadata says what
the name, type and default cannot: a metavar, another flag name (a negated switch such as
`--no-eval`), what a None default means on the command line, a positional argument.
Validation is the model's own: errors name the flag (`--max-steps: 0 must be greater than 0.`).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fms_acceleration import StanzaModel
from fms_acceleration.validation import config_error, unwrap_annotation


@dataclass(frozen=True)
class Flag:
    """How a field shows on the command line, where its name, type and default do not say it."""

    name: str | None = None
    """the flag, if not `--` + the field name with dashes (a negated switch: `--no-eval`)"""
    metavar: str | None = None
    """what --help shows for the value (default: N for integers, else the name in capitals)"""
    default: str | None = None
    """what the default means, for --help, where the value (None) does not say it"""
    positional: bool = False
    """a positional argument (its metavar is its name on the command line)"""


def flag_name(field_name: str) -> str:
    """`max_steps` -> `--max-steps`."""
    return "--" + field_name.replace("_", "-")


def _flag_of(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _argparse_options(name: str, field: FieldInfo, default: Any) -> tuple[list[str], dict]:
    """(names, keyword arguments) of `parser.add_argument` for one field."""
    flag = _flag_of(field)
    kind = unwrap_annotation(field.annotation)
    origin = typing.get_origin(kind)
    help_text = field.description or ""
    options: dict[str, Any] = {"dest": name, "default": default}
    if kind is bool:
        # a switch turns its default around: --full-finetuning sets True, --no-eval False
        options["action"] = "store_false" if default else "store_true"
        if default:
            help_text = f"do not {help_text}"
        names = [flag.name or flag_name(("no_" if default else "") + name)]
        return names, {**options, "help": help_text.replace("%", "%%")}
    if origin is Literal:
        choices = typing.get_args(kind)
        options.update(choices=choices, type=type(choices[0]))
    elif origin in (tuple, list):
        options.update(nargs="+", type=unwrap_annotation(typing.get_args(kind)[0]), metavar="NAME")
        options["default"] = None if default is None else list(default)
    elif kind in (int, float, str):
        options["type"] = kind
        if kind is int:
            options["metavar"] = "N"
    else:
        raise TypeError(
            f"{name}: no command-line flag for a field of type {kind!r}; use an int, float, str, "
            "bool, a choice(...) or a tuple of one of them, or exclude the field from the flags"
        )
    if flag.metavar:
        options["metavar"] = flag.metavar
    if default is PydanticUndefined:  # a required field
        del options["default"]
        options["required"] = True
    else:
        shown = flag.default if default is None else _shown(default)
        if shown is not None:
            help_text = f"{help_text} (default: {shown})"
    options["help"] = help_text.replace("%", "%%")
    if flag.positional:
        if "required" not in options:
            raise TypeError(f"{name}: a positional argument must be a required field")
        del options["dest"], options["required"]
        return [name], {"metavar": name.upper(), **options}
    return [flag.name or flag_name(name)], options


_ABSENT = object()
_Model = TypeVar("_Model", bound="FlagModel")


class FlagModel(StanzaModel):
    """Options that are command-line flags: `add_flags` puts them on a parser, `from_flags`
    reads them back, and a bad value is an `error_type` that names the flag."""

    model_config = ConfigDict(alias_generator=flag_name, populate_by_name=True)
    error_type: ClassVar[type[Exception]] = ValueError

    def __init__(self, **values: Any) -> None:
        try:
            # by flag, so that errors name the flag the user typed
            super().__init__(**{flag_name(name): value for name, value in values.items()})
        except ValidationError as err:
            raise config_error(err, "", type(self), self.error_type) from None

    @classmethod
    def add_flags(
        cls,
        parser: argparse.ArgumentParser,
        exclude: Collection[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a flag per field (but those in `exclude`), with `defaults` replacing the fields'."""
        for name, field in cls.model_fields.items():
            if name in exclude:
                continue
            if defaults and name in defaults:
                default = defaults[name]
            elif field.is_required():
                default = PydanticUndefined
            else:
                default = field.get_default(call_default_factory=True)
            names, options = _argparse_options(name, field, default)
            parser.add_argument(*names, **options)

    @classmethod
    def from_flags(cls: type[_Model], args: argparse.Namespace, **values: Any) -> _Model:
        """The model of the parsed flags (those `add_flags` added), `values` replacing them."""
        given = {
            name: tuple(value) if isinstance(value, list) and _is_tuple(field) else value
            for name, field in cls.model_fields.items()
            if (value := getattr(args, name, _ABSENT)) is not _ABSENT
        }
        return cls(**{**given, **values})


def _is_tuple(field: FieldInfo) -> bool:
    return typing.get_origin(unwrap_annotation(field.annotation)) is tuple

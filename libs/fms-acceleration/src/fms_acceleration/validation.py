"""One validation system for everything a user writes: pydantic v2 models, one error translator.

Plugins (and the schedule, adapter, train-job and search-space readers) declare what they accept
as `StanzaModel` subclasses. `validate_model` runs pydantic and turns its first error into one
message that names the dotted path, the offending value, what is allowed and, for a likely typo,
the closest valid name.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from .errors import AccelerationPluginConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StanzaModel(BaseModel):
    """Base of every schema: unknown keys are refused, types are not coerced (YAML `1` is not
    `true`, `"1"` is not a number), an integer is accepted where a number is expected, and
    `.nan` / `.inf` are refused."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        use_attribute_docstrings=True,
        protected_namespaces=(),
    )


# --- rendering ----------------------------------------------------------------------------------

_TYPE_NAMES = {
    bool: "a boolean (true/false)",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
    list: "a list",
}

# pydantic error type -> what was expected
_EXPECTED_BY_ERROR = {
    "bool_type": bool,
    "bool_parsing": bool,
    "int_type": int,
    "int_parsing": int,
    "int_from_float": int,
    "float_type": float,
    "float_parsing": float,
    "string_type": str,
    "dict_type": dict,
    "model_type": dict,
    "model_attributes_type": dict,
    "list_type": list,
    "tuple_type": list,
}


def show(value: Any) -> str:
    """Render a value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    text = repr(value)
    if isinstance(value, str) or len(text) <= 120:  # a path or a name is shown whole
        return text
    return text[:117] + "..."


def type_name(kind: type) -> str:
    """'an integer', 'a mapping', ... for error messages."""
    return _TYPE_NAMES.get(kind, kind.__name__)


def close_match(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate closest to `word`, if any is close enough to be a likely typo."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def suggestion(word: str, candidates: Sequence[str]) -> str:
    """A ' (did you mean X?)' suffix for an error message, or ''."""
    match = close_match(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""


def number_as_string_hint(value: Any) -> str:
    """YAML 1.1 reads `1e-5` (no dot) as a string: say so when that is what happened."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    mantissa, _, exponent = value.lower().partition("e")
    fixed = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}" if exponent else ""
    spelled = f" (write {fixed})" if fixed else " (remove the quotes)"
    return f"; YAML read {value} as a string{spelled}"


# --- exact choices -------------------------------------------------------------------------------


def _same_value(a: Any, b: Any) -> bool:
    # `True == 1` in Python; a YAML `1` must not satisfy a `true` choice.
    return type(a) is type(b) and a == b


def _exact_choice(choices: tuple[Any, ...], value: Any) -> Any:
    if any(_same_value(value, c) for c in choices):
        return value
    raise PydanticCustomError("literal_error", "not an allowed value", {"choices": choices})


def choice(*values: Any) -> Any:
    """A field type that accepts exactly these values (type and value), e.g. `true` or a name."""
    return Annotated[Literal[values], BeforeValidator(partial(_exact_choice, values))]


# --- walking a model to a location ---------------------------------------------------------------


def unwrap_annotation(annotation: Any) -> Any:
    """The type inside Annotated / Optional wrappers (`Annotated[int | None, ...]` -> int)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _sub_annotation(annotation: Any, part: str | int) -> Any:
    annotation = unwrap_annotation(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple, Sequence) and args:
        return args[0]
    if origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _sub_annotation(arg, part)
            if found is not None:
                return found
    return None


def _annotation_at(model: type[BaseModel], loc: Sequence[str | int]) -> Any:
    annotation: Any = model
    for part in loc:
        annotation = _sub_annotation(annotation, part)
        if annotation is None:
            return None
    return annotation


def _model_fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    annotation = unwrap_annotation(_annotation_at(model, loc))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sorted(f.alias or name for name, f in annotation.model_fields.items())
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names: set[str] = set()
        for arg in typing.get_args(annotation):
            arg = unwrap_annotation(arg)
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= set(arg.model_fields)
        return sorted(names)
    return []


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    annotation = unwrap_annotation(annotation)
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found += _literal_choices(arg)
        return tuple(found)
    return ()


# --- the translator ------------------------------------------------------------------------------


def _dotted(path: str, loc: Sequence[str | int]) -> str:
    out = path
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else (f"{out}.{part}" if out else part)
    return out


def _error_order(error: Mapping[str, Any]) -> int:
    # a typo is the most useful thing to report first; a missing key the least
    return {"extra_forbidden": 0, "missing": 2}.get(error["type"], 1)


def describe_error(error: Mapping[str, Any], path: str, model: type[BaseModel]) -> str:
    """One pydantic error as our message: dotted path, offending value, what is allowed."""
    loc = tuple(error["loc"])
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _model_fields_at(model, loc[:-1])
        listed = f"; allowed keys: {', '.join(allowed)}." if allowed else "."
        return f"{_dotted(path, loc)}: unknown key '{key}'{suggestion(key, allowed)}{listed}"
    where = _dotted(path, loc)
    if kind == "missing":
        return f"{where}: required key is missing."
    if kind == "literal_error":
        choices = tuple(ctx.get("choices") or _literal_choices(_annotation_at(model, loc)))
        allowed = ", ".join(show(c) for c in choices)
        hint = suggestion(str(value), [str(c) for c in choices])
        return f"{where}: {show(value)} is not an allowed value{hint}; allowed: {allowed}."
    if kind in ("model_type", "dict_type") and not loc:
        return f"{where}: expected a mapping of options, got {type(value).__name__} {show(value)}."
    if kind in _EXPECTED_BY_ERROR:
        expected = _EXPECTED_BY_ERROR[kind]
        hint = number_as_string_hint(value) if expected in (int, float) else ""
        return (
            f"{where}: expected {type_name(expected)}, got {type(value).__name__} "
            f"{show(value)}{hint}."
        )
    if kind == "finite_number":
        return f"{where}: {show(value)} is not a finite number."
    if kind in ("too_short", "too_long", "string_too_short", "string_too_long"):
        short = kind.endswith("too_short")
        limit = ctx.get("min_length" if short else "max_length")
        if isinstance(value, str):
            actual, unit = len(value), "characters"
        else:
            actual, unit = ctx.get("actual_length"), "entries"
        return (
            f"{where}: {show(value)} has {actual} {unit}; "
            f"{f'at least {limit} needed' if short else f'at most {limit} allowed'}."
        )
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if isinstance(value, Mapping):
        # a check across the keys of a mapping: its message says which keys; the whole
        # mapping would only bury it
        return f"{where}: {message.rstrip('.')}."
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = message.replace("Input should be ", "must be ")
    return f"{where}: {show(value)} {message.rstrip('.')}."


def config_error(
    err: ValidationError,
    path: str,
    model: type[BaseModel],
    error_type: type[Exception] = AccelerationPluginConfigError,
    owner: str | None = None,
) -> Exception:
    """Translate a pydantic ValidationError into `error_type` with our message; `owner` (a
    plugin class name) is named as the reference named it: "<owner>: Value at '<key>'"."""
    errors = sorted(err.errors(include_url=False), key=_error_order)
    message = describe_error(errors[0], path, model)
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more problem(s) in {path or 'the input'})"
    if owner is not None:
        key = _dotted(path, tuple(errors[0]["loc"])).removeprefix("plugins.")
        message += f" ({owner}: Value at '{key}' is invalid)"
    return error_type(message)


def validate_model(
    model: type[ModelT],
    data: Any,
    path: str,
    error_type: type[Exception] = AccelerationPluginConfigError,
    owner: str | None = None,
) -> ModelT:
    """Validate `data` (None counts as an empty mapping) into `model`, or raise `error_type`
    (naming `owner`, the plugin class whose schema refused it, when given)."""
    try:
        return model.model_validate({} if data is None else data)
    except ValidationError as err:
        raise config_error(err, path, model, error_type, owner) from None

"""Suggesting a trial's parameters from the search space, and putting them where they go: train
options, or keys of other plugins' stanzas. Pure: no framework, no Trainer."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fms_acceleration.validation import suggestion

from .errors import SearchError
from .options import PATH, SearchParameter

SUGGEST_TYPES = ("categorical", "float", "int")


def suggest(trial: Any, type_name: str, name: str, **kwargs: Any) -> Any:
    """`trial.suggest_<type_name>(name, **kwargs)` for type float, int or categorical."""
    if type_name not in SUGGEST_TYPES:
        raise SearchError(
            f"suggest: '{type_name}' is not a suggestion type{suggestion(type_name, SUGGEST_TYPES)}"
            f"; use one of {', '.join(SUGGEST_TYPES)}"
        )
    return getattr(trial, f"suggest_{type_name}")(name, **kwargs)


def suggest_search_space(
    trial: Any,
    search_space: Sequence[SearchParameter],
    after_each: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One value per entry, in order; `after_each` runs after every suggestion."""
    values: dict[str, Any] = {}
    for entry in search_space:
        values[entry.name] = suggest(trial, entry.type, entry.name, **entry.suggest_kwargs())
        if after_each is not None:
            after_each()
    return values


def lowest_values(search_space: Sequence[SearchParameter]) -> dict[str, Any]:
    """A valid point of the space (low bounds, first choices) to check the targets with."""
    values = {}
    for entry in search_space:
        kwargs = entry.suggest_kwargs()
        values[entry.name] = kwargs["choices"][0] if entry.type == "categorical" else kwargs["low"]
    return values


def apply_values(
    values: Mapping[str, Any],
    search_space: Sequence[SearchParameter],
    train_options: Mapping[str, Any],
    configuration: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train options, acceleration configuration) with each value at its entry's target.

    A dotted target must be a key of a stanza the configuration already has: setting it would
    otherwise switch on a plugin the user did not ask for.
    """
    train = dict(train_options)
    config = copy.deepcopy(dict(configuration))
    for index, entry in enumerate(search_space):
        value = values[entry.name]
        target = entry.destination
        if "." not in target:
            train[target] = value
            continue
        *parents, key = target.split(".")
        node: Any = config.get("plugins")
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise SearchError(
                    f"{PATH}.search_space[{index}].target: '{target}' is a key of the stanza "
                    f"plugins.{'.'.join(parents)}, which the configuration does not have; add "
                    "the stanza to tune one of its keys"
                )
            node = node[part]
        node[key] = value
    return train, config

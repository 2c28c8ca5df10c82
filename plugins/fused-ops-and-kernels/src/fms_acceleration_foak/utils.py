"""Helpers the reference exposed as `fms_acceleration_foak.utils` (its tests and plugin authors
import them from here)."""

from __future__ import annotations

from collections.abc import Iterable

from fms_acceleration import ModelPatcherRule


def filter_mp_rules(
    rules: Iterable[ModelPatcherRule], filter_endswith: Iterable[str], drop: bool = False
) -> list[ModelPatcherRule]:
    """The rules whose id ends with one of `filter_endswith`; with drop=True, all the others."""
    endings = tuple(filter_endswith)
    return [rule for rule in rules if rule.rule_id.endswith(endings) != drop]

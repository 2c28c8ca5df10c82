"""Reading and writing a nested mapping at a dotted path ('training.attention.padding_free')."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(tree: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    """(found, value) at `path`; found is False when a part is missing or not a mapping."""
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def set_at(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at `path`, creating the mappings above it."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value

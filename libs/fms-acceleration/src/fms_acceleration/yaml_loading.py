"""The one strict YAML loader: used for acceleration configs, schedules and sample configs.

Stricter than `yaml.safe_load` where a silent surprise would cost the user: duplicate keys
(PyYAML keeps the last), non-scalar keys, alias bombs ("billion laughs"), runaway nesting and
non-UTF-8 files are refused with the file name and, where there is one, line and column.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import AccelerationPluginConfigError

MAX_DEPTH = 64  # far beyond any configuration; PyYAML itself recurses per level
MAX_EXPANDED_NODES = 100_000  # nodes after aliases are expanded (a config has a few hundred)


def _where(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate and non-scalar keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "sequence" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise _KeyProblem(
                f"a mapping key{_where(key_node.start_mark)} is a {kind}; keys must be "
                "plain names or numbers"
            )
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise _KeyProblem(
                f"duplicate key '{key}' at line {key_node.start_mark.line + 1} "
                f"(first defined at line {first})"
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


class _KeyProblem(Exception):
    pass


def _check_size_and_depth(root: yaml.Node) -> str | None:
    """Expanded node count and depth of the composed graph, without expanding it."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()

    def visit(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key], depths[key]
        if key in active:
            raise _KeyProblem(f"an alias{_where(node.start_mark)} refers to itself")
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        active.add(key)
        size, depth = 1, 1
        for child in children:
            child_size, child_depth = visit(child)
            size += child_size
            depth = max(depth, child_depth + 1)
        active.discard(key)
        sizes[key], depths[key] = size, depth
        return size, depth

    size, depth = visit(root)
    if depth > MAX_DEPTH:
        return f"nesting is {depth} levels deep; at most {MAX_DEPTH} are allowed"
    if size > MAX_EXPANDED_NODES:
        return (
            f"aliases expand to {size:,} values (at most {MAX_EXPANDED_NODES:,}); "
            "this looks like an alias bomb"
        )
    return None


def load_yaml(
    text: str, source: str, error_type: type[Exception] = AccelerationPluginConfigError
) -> Any:
    """Parse YAML text; every problem becomes `error_type` naming `source` (and line, column)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problem = _check_size_and_depth(node)
        if problem:
            raise error_type(f"{source}: {problem}.")
        return loader.construct_document(node)
    except _KeyProblem as err:
        raise error_type(f"{source}: {err}.") from None
    except RecursionError:
        raise error_type(
            f"{source}: nesting is too deep to read; at most {MAX_DEPTH} levels are allowed."
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        raise error_type(f"{source}: YAML syntax error{_where(mark)}: {problem}.") from None
    finally:
        loader.dispose()


def read_text_file(
    path: str | os.PathLike, what: str, error_type: type[Exception] = AccelerationPluginConfigError
) -> str:
    """A UTF-8 text file's content; a missing file, a folder or bad bytes name the path."""
    path = Path(path)
    if path.is_dir():
        raise error_type(f"{path}: is a folder, expected a {what} file.")
    if not path.is_file():
        raise error_type(f"{path}: {what} file does not exist.")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error_type(f"{path}: cannot read the {what} file: {err.strerror}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error_type(
            f"{path}: the {what} file is not UTF-8 text (byte 0x{data[err.start]:02x} at "
            f"line {line}); save it as UTF-8."
        ) from None


def read_yaml_file(
    path: str | os.PathLike, what: str, error_type: type[Exception] = AccelerationPluginConfigError
) -> Any:
    """Read and strictly parse a YAML file."""
    return load_yaml(read_text_file(path, what, error_type), str(path), error_type)

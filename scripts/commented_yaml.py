"""Block-style YAML whose comments stay with the keys they describe, over ruamel.yaml.

ruamel.yaml round-trips comments, but hangs each comment line on the token before it: the lines
above key B sit on the value of key A, or deep inside A's last nested value, so deleting A drops
B's comments and copying B into another document leaves them behind. `load` hangs them again:
the lines above a key become that key's own (ruamel's "before the key" slot), the lines after a
mapping's last key that are indented under it close that mapping (its "end" slot), and only a
comment on the same line as a value stays with the value. Then `remove`, `comment_out` and
`copy_key` move a key together with its comments, and `dump` writes what ruamel would.

Only the mappings along keys are re-hung; a sequence keeps its inner comments as ruamel read
them (only the lines after its last item are taken off, as for any other value).
"""

from __future__ import annotations

import copy
import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString
from ruamel.yaml.tokens import CommentToken

# ruamel's per-key comment slots: ca.items[key] = [_, before key, after value, before first child]
_BEFORE, _AFTER, _FIRST_CHILD = 1, 2, 3


def _represent_float(representer: Any, value: float) -> Any:
    """A float as YAML 1.1 readers (PyYAML, the core's loader) read it back: ruamel writes
    1e-05, which they take for a string."""
    if value != value or value in (float("inf"), float("-inf")):
        text = ".nan" if value != value else ("-.inf" if value < 0 else ".inf")
    else:
        text = repr(value).lower()
        if "e" in text and "." not in text:
            text = text.replace("e", ".0e", 1)
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


class _Representer(RoundTripRepresenter):
    """ruamel's round-trip representer with `_represent_float` (its own class, so ruamel's
    shared one is left as it was)."""


_Representer.add_representer(float, _represent_float)


def _yaml() -> YAML:
    yaml = YAML()  # round-trip mode
    yaml.indent(mapping=2, sequence=2, offset=0)
    yaml.width = 4096  # never fold a long scalar the author wrote on one line
    yaml.preserve_quotes = True
    yaml.Representer = _Representer
    return yaml


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _token_lines(token: CommentToken) -> list[str]:
    """The lines of a comment token, each with the indentation it had in the file."""
    lines = token.value.splitlines()
    if lines and lines[0]:
        lines[0] = " " * token.start_mark.column + lines[0]
    return lines


def _lines(tokens: list[CommentToken | None] | None) -> list[str]:
    return [line for token in tokens or [] if token is not None for line in _token_lines(token)]


def _tokens(lines: list[str]) -> list[CommentToken] | None:
    """Comment tokens ruamel writes as whole lines at their own column ("" is a blank line)."""
    if not lines:
        return None
    return [
        CommentToken(line.lstrip(" ") + "\n", CommentMark(_indent(line)))
        if line.strip()
        else CommentToken("\n", CommentMark(0))
        for line in lines
    ]


def _take_after(ca_items: dict, key: Any, value: Any, slot: int) -> list[str]:
    """Remove and return the whole lines hung after `value` (a scalar or a flow collection),
    leaving only a comment on the value's own line."""
    entry = ca_items.get(key)
    token = entry[slot] if entry else None
    if token is None:
        return []
    text = token.value
    if isinstance(value, (LiteralScalarString, FoldedScalarString)):
        # a block scalar ends with its line break: everything after it is whole lines
        entry[slot] = None
        return _token_lines(token)
    same_line, _, rest = text.partition("\n")
    if same_line:
        token.value = same_line + "\n"
    else:
        entry[slot] = None
        if isinstance(value, (CommentedMap, CommentedSeq)) and value.ca.comment:
            value.ca.comment[0] = None  # ruamel keeps a flow collection's copy of the slot
    return rest.splitlines()


def _is_block(value: Any) -> bool:
    return (
        isinstance(value, (CommentedMap, CommentedSeq))
        and bool(value)
        and not value.fa.flow_style()
    )


def _split_trailing(lines: list[str], column: int) -> tuple[list[str], list[str]]:
    """(lines indented under a mapping at `column`, the rest): the first comment line that is
    less indented, with the blank lines before it, and everything after belong further out."""
    cut = 0
    for i, line in enumerate(lines):
        if line.strip():
            if _indent(line) < column:
                break
            cut = i + 1
    return lines[:cut], lines[cut:]


def _hang_mapping(mapping: CommentedMap, leading: list[str]) -> list[str]:
    """Re-hang the comments of `mapping` (see the module doc); `leading` are the lines above
    its first key. Returns the lines after its last key that belong further out."""
    pending = leading
    column = mapping.lc.key(next(iter(mapping)))[1] if mapping else 0
    for key, value in mapping.items():
        entry = mapping.ca.items.get(key)
        set_comments_before(mapping, key, pending + _lines(entry[_BEFORE] if entry else None))
        if isinstance(value, CommentedMap) and _is_block(value):
            # the lines above the first child hang after `key:` or in the first-child slot
            first = _take_after(mapping.ca.items, key, value, _AFTER)
            first += _lines(entry[_FIRST_CHILD] if entry else None)
            if entry:
                entry[_FIRST_CHILD] = None
            if value.ca.comment:
                value.ca.comment[1] = None
            pending = _hang_mapping(value, first)
        elif isinstance(value, CommentedSeq) and _is_block(value):
            pending = _hang_sequence_tail(value)
        else:
            pending = _take_after(mapping.ca.items, key, value, _AFTER)
    inside, outside = _split_trailing(pending, column)
    _set_end(mapping, inside)
    return outside


def _hang_sequence_tail(sequence: CommentedSeq) -> list[str]:
    """Take the lines after a block sequence's last item off that item."""
    last = len(sequence) - 1
    value = sequence[last]
    if isinstance(value, CommentedMap) and _is_block(value):
        return _hang_mapping(value, [])
    if isinstance(value, CommentedSeq) and _is_block(value):
        return _hang_sequence_tail(value)
    return _take_after(sequence.ca.items, last, value, 0)


def _set_end(mapping: CommentedMap, lines: list[str]) -> None:
    """Lines written after the mapping's last key (ruamel writes `ca.end` only when the
    mapping's own comment slot exists)."""
    mapping.ca.end = _tokens(lines)
    if lines and mapping.ca.comment is None:
        mapping.ca.comment = [None, None]


def load(text: str) -> CommentedMap:
    """Parse a block-style YAML mapping with every comment line hung on the key below it."""
    root = _yaml().load(text)
    if not isinstance(root, CommentedMap):
        raise ValueError("the document is not a mapping")
    leading = _lines(root.ca.comment[1]) if root.ca.comment else []
    if root.ca.comment:
        root.ca.comment[1] = None
    _hang_mapping(root, leading)  # at column 0 nothing is further out
    return root


def dump(root: CommentedMap) -> str:
    """YAML text of `root` (not changed by dumping)."""
    out = io.StringIO()
    _yaml().dump(copy.deepcopy(root), out)
    return out.getvalue()


def comments_before(mapping: CommentedMap, key: Any) -> list[str]:
    """The whole comment lines above `key` ("" for a blank line)."""
    entry = mapping.ca.items.get(key)
    return _lines(entry[_BEFORE] if entry else None)


def set_comments_before(mapping: CommentedMap, key: Any, lines: list[str]) -> None:
    """Replace the comment lines above `key`."""
    entry = mapping.ca.items.get(key)
    if entry is None and not lines:
        return
    if entry is None:
        entry = mapping.ca.items[key] = [None, None, None, None]
    entry[_BEFORE] = _tokens(lines)


def comments_after(mapping: CommentedMap) -> list[str]:
    """The comment lines after the mapping's last key, indented under it."""
    return _lines(mapping.ca.end)


def remove(mapping: CommentedMap, key: Any) -> None:
    """Delete `key`, its value and its comments; the comments of the keys around it stay."""
    del mapping[key]
    mapping.ca.items.pop(key, None)


def comment_out(mapping: CommentedMap, key: Any, column: int) -> None:
    """Turn `key: scalar` into the comment line `# key: scalar` (at `column`), in place."""
    value = mapping[key]
    entry = mapping.ca.items.get(key)
    same_line = entry[_AFTER].value.rstrip("\n") if entry and entry[_AFTER] else ""
    text = one_line(key, value) + (f"  {same_line}" if same_line else "")
    lines = [*comments_before(mapping, key), " " * column + "# " + text]
    keys = list(mapping)
    following = keys[keys.index(key) + 1] if key != keys[-1] else None
    remove(mapping, key)
    if following is None:
        _set_end(mapping, lines + comments_after(mapping))
    else:
        set_comments_before(mapping, following, lines + comments_before(mapping, following))


def one_line(key: Any, value: Any) -> str:
    """`key: value` as YAML writes it on one line."""
    text = dump(CommentedMap([(key, value)])).rstrip("\n")
    if "\n" in text:
        raise ValueError(f"'{key}' holds more than one line of YAML")
    return text


def copy_key(source: CommentedMap, key: Any, target: CommentedMap) -> None:
    """Add `key` of `source` at the end of `target`, with its value's and its own comments."""
    target[key] = copy.deepcopy(source[key])
    entry = source.ca.items.get(key)
    if entry is not None:
        target.ca.items[key] = copy.deepcopy(entry)

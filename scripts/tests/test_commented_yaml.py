"""commented_yaml: every comment line belongs to the key below it (or closes its mapping), so
keys can be removed, commented out and copied without losing or stealing comments."""

from __future__ import annotations

import pytest
import yaml

import commented_yaml as cy

DOC = """\
# file header

top:  # same line as top
  # above a
  a: 1  # same line as a
  # above b
  b: "two"

  # above items
  items:
  - x  # same line as x
  # above y
  - y
  # above note
  note: |
    kept as written
  # above flow
  flow: {}
  # above last
  last: true
  # closes top
# above other
other:
  inner:
    k: v
    # closes inner
  # closes other
# end of file
"""


def _without(text: str, block: str) -> str:
    """`text` with `block` (whole lines, there exactly once) left out."""
    assert text.count(block) == 1, block
    return text.replace(block, "", 1)


def test_load_and_dump_give_back_the_same_text():
    assert cy.dump(cy.load(DOC)) == DOC


def test_each_comment_line_hangs_on_the_key_below_it_or_closes_its_mapping():
    root = cy.load(DOC)
    top = root["top"]
    assert {key: cy.comments_before(top, key) for key in top} == {
        "a": ["  # above a"],
        "b": ["  # above b"],
        "items": ["", "  # above items"],
        "note": ["  # above note"],
        "flow": ["  # above flow"],
        "last": ["  # above last"],
    }
    assert cy.comments_before(root, "top") == ["# file header", ""]
    assert cy.comments_before(root, "other") == ["# above other"]
    assert cy.comments_after(top) == ["  # closes top"]
    assert cy.comments_after(root["other"]["inner"]) == ["    # closes inner"]
    assert cy.comments_after(root["other"]) == ["  # closes other"]
    assert cy.comments_after(root) == ["# end of file"]


@pytest.mark.parametrize(
    ("key", "gone"),
    [
        ("a", "  # above a\n  a: 1  # same line as a\n"),  # the first key of a mapping
        ("b", '  # above b\n  b: "two"\n'),  # in the middle
        ("items", "\n  # above items\n  items:\n  - x  # same line as x\n  # above y\n  - y\n"),
        ("note", "  # above note\n  note: |\n    kept as written\n"),  # a block scalar
        ("flow", "  # above flow\n  flow: {}\n"),
        ("last", "  # above last\n  last: true\n"),  # the last key: the closing line stays
    ],
)
def test_remove_takes_the_key_with_its_own_comments_only(key, gone):
    root = cy.load(DOC)
    cy.remove(root["top"], key)
    assert cy.dump(root) == _without(DOC, gone)


def test_remove_a_whole_nested_mapping_keeps_the_comments_around_it():
    root = cy.load(DOC)
    cy.remove(root, "top")
    assert cy.dump(root) == DOC[DOC.index("# above other") :]
    root = cy.load(DOC)
    cy.remove(root["top"], "items")
    cy.remove(root["other"], "inner")  # an emptied mapping is written `{}`, nothing to close
    assert cy.dump(root).endswith("  # closes top\n# above other\nother: {}\n# end of file\n")


@pytest.mark.parametrize(
    ("key", "line", "commented"),
    [
        ("a", "  a: 1  # same line as a", "  # a: 1  # same line as a"),
        ("b", '  b: "two"', '  # b: "two"'),
        ("last", "  last: true", "  # last: true"),
    ],
)
def test_comment_out_keeps_the_line_in_place_as_a_comment(key, line, commented):
    root = cy.load(DOC)
    cy.comment_out(root["top"], key, column=2)
    assert cy.dump(root) == DOC.replace(line + "\n", commented + "\n")
    assert key not in root["top"]
    # the commented line and the lines above it now hang on the next key or close the mapping
    keys = list(cy.load(DOC)["top"])
    if key == keys[-1]:
        assert cy.comments_after(root["top"]) == ["  # above last", commented, "  # closes top"]
    else:
        following = keys[keys.index(key) + 1]
        assert cy.comments_before(root["top"], following) == [
            f"  # above {key}",
            commented,
            *cy.comments_before(cy.load(DOC)["top"], following),
        ]


def test_comment_out_refuses_a_value_of_several_lines():
    root = cy.load(DOC)
    with pytest.raises(ValueError, match="'note' holds more than one line of YAML"):
        cy.comment_out(root["top"], "note", column=2)
    assert cy.dump(root) == DOC


def test_copy_key_brings_its_comments_and_leaves_the_source_alone():
    source = cy.load(DOC)
    target = cy.load("# mine\nplugins:\n  x: 1\n")
    cy.copy_key(source, "other", target)
    assert cy.dump(target) == (
        "# mine\nplugins:\n  x: 1\n# above other\nother:\n  inner:\n    k: v\n"
        "    # closes inner\n  # closes other\n"
    )
    assert cy.dump(source) == DOC


def test_set_comments_before_and_one_line():
    root = cy.load(DOC)
    cy.set_comments_before(root, "top", [])
    cy.set_comments_before(root["top"], "b", ["  # new", ""])
    text = cy.dump(root)
    assert text.startswith("top:  # same line as top\n")
    assert '  # new\n\n  b: "two"\n' in text
    assert cy.one_line("flag", True) == "flag: true"
    assert cy.one_line("kernel", "torch") == "kernel: torch"


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-5, "1.0e-05"), (0.5, "0.5"), (3.0, "3.0"), (-2e20, "-2.0e+20"), (float("inf"), ".inf")],
)
def test_floats_are_written_so_that_yaml_1_1_readers_get_floats_back(value, text):
    """PyYAML (the core's loader) reads ruamel's default `1e-05` as a string."""
    assert cy.one_line("lr", value) == f"lr: {text}"
    assert yaml.safe_load(cy.one_line("lr", value)) == {"lr": value}


def test_load_refuses_a_document_that_is_not_a_mapping():
    with pytest.raises(ValueError, match="the document is not a mapping"):
        cy.load("- a\n- b\n")

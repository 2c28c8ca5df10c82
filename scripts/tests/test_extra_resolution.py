"""The client's extra against our wheels (scripts/client/extra_resolution.py): reading the
extra, what is asked of pip, and judging pip's report. `tox -e client` runs the resolutions."""

from __future__ import annotations

from pathlib import Path

import extra_resolution as er
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# the extras part of fms-hf-tuning 3.2.2's METADATA, as published
METADATA = """Metadata-Version: 2.4
Name: fms-hf-tuning
Version: 3.2.2
Requires-Dist: numpy<2.2.0,>=1.26.4
Requires-Dist: torch<2.9.0,>2.7.0
Provides-Extra: fms-accel
Requires-Dist: fms-acceleration>=0.6.4; extra == "fms-accel"
Provides-Extra: gptq-dev
Requires-Dist: auto_gptq>0.4.2; extra == "gptq-dev"
Provides-Extra: fms-accel-all
Requires-Dist: fms-acceleration>=0.6.4; extra == "fms-accel-all"
Requires-Dist: fms-acceleration-peft>=0.4.4; extra == "fms-accel-all"
Requires-Dist: fms-acceleration-foak>=0.7.4; extra == "fms-accel-all"
Requires-Dist: fms-acceleration-aadp>=0.2.2; extra == "fms-accel-all"
Requires-Dist: fms-acceleration-moe>=0.4.6; extra == "fms-accel-all"
Requires-Dist: fms-acceleration-odm>=0.1.6; extra == "fms-accel-all"

# FMS HF Tuning
Requires-Dist: in-the-description>=1; extra == "fms-accel-all"
"""
ALL = [
    "fms-acceleration",
    *(f"fms-acceleration-{p}" for p in ("peft", "foak", "aadp", "moe", "odm")),
]


def test_extra_requirements_are_the_lines_the_extra_adds():
    full = er.extra_requirements(METADATA, "fms-accel-all")
    assert [r.name for r in full] == ALL
    assert str(full[1].specifier) == ">=0.4.4"
    assert [r.name for r in er.extra_requirements(METADATA, "fms-accel")] == ["fms-acceleration"]
    assert er.extra_requirements(METADATA, "nope") == []


def test_the_request_is_the_full_extra_and_its_own_requirements():
    full = er.extra_requirements(METADATA, "fms-accel-all")
    assert er.client_request() == ["fms-hf-tuning[fms-accel-all]==3.2.2"]
    assert er.extra_request(full) == [
        "fms-acceleration>=0.6.4",
        "fms-acceleration-peft>=0.4.4",
        "fms-acceleration-foak>=0.7.4",
        "fms-acceleration-aadp>=0.2.2",
        "fms-acceleration-moe>=0.4.6",
        "fms-acceleration-odm>=0.1.6",
    ]


def test_we_build_every_package_the_extra_names_at_a_version_it_accepts():
    folders = er.package_folders((er.ROOT / "packages.txt").read_text(encoding="utf-8"))
    projects = [tomllib.loads((f / "pyproject.toml").read_text())["project"] for f in folders]
    ours = {canonicalize_name(p["name"]): p["version"] for p in projects}
    full = er.extra_requirements(METADATA, "fms-accel-all")
    assert len(full) == 6
    for requirement in full:
        version = ours[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)


def _item(name: str, version: str, url: str) -> dict:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


def test_picked_marks_what_comes_from_our_wheels_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    report = {
        "install": [
            _item("fms_acceleration", "0.8.0", (wheels / "fms_acceleration-0.8.0.whl").as_uri()),
            _item("torch", "2.13.0+cpu", "file:///opt/wheels/torch-2.13.0.whl"),
            _item("fms-acceleration-peft", "0.4.4", "https://files.example.org/p/peft.whl"),
        ]
    }
    assert er.picked(report, wheels) == [
        er.Picked("fms-acceleration", "0.8.0", True, "our wheel"),
        er.Picked("fms-acceleration-peft", "0.4.4", False, "files.example.org"),
        er.Picked("torch", "2.13.0+cpu", False, "local wheel"),
    ]


def test_problems_name_a_family_package_not_ours_or_missing():
    ours = {"fms-acceleration": "0.8.0", "fms-acceleration-peft": "0.8.0"}
    good = [
        er.Picked("fms-acceleration", "0.8.0", True, "our wheel"),
        er.Picked("fms-acceleration-peft", "0.8.0", True, "our wheel"),
        er.Picked("torch", "2.8.0", False, "pypi"),
    ]
    assert er.problems(good, ours, list(ours)) == []
    bad = [
        er.Picked("fms-acceleration", "0.8.0", True, "our wheel"),
        er.Picked("fms-acceleration-foak", "0.7.4", False, "pypi"),
    ]
    assert er.problems(bad, ours, list(ours)) == [
        "fms-acceleration-foak 0.7.4 comes from the index, not our wheel (we build none)",
        "fms-acceleration-peft is not in the resolution",
    ]
    stale = [er.Picked("fms-acceleration", "0.7.0", True, "our wheel")]
    assert er.problems(stale, ours, ["fms-acceleration"]) == [
        "fms-acceleration 0.7.0 is ours at our wheel 0.8.0"
    ]


def test_package_folders_and_wheel_versions(tmp_path):
    text = "# comment\n-e libs/a\n-e plugins/b\nhatchling\n"
    assert er.package_folders(text, Path("/r")) == [Path("/r/libs/a"), Path("/r/plugins/b")]
    for name in (
        "fms_acceleration-0.8.0-py3-none-any.whl",
        "fms_acceleration_peft-0.8.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    assert er.wheel_versions(tmp_path) == {
        "fms-acceleration": "0.8.0",
        "fms-acceleration-peft": "0.8.0",
    }


def test_section_lists_the_family_and_the_stack_and_the_problems():
    rows = [
        er.Picked("fms-acceleration", "0.8.0", True, "our wheel"),
        er.Picked("numpy", "2.1.3", False, "pypi"),
        er.Picked("torch", "2.8.0", False, "pypi"),
    ]
    text = er.section("client", ["x[y]==1"], rows, [])
    assert "`pip install x[y]==1`" in text and "| fms-acceleration | 0.8.0 | our wheel |" in text
    assert "numpy" not in text and "| torch | 2.8.0 | pypi |" in text and "all ours" in text
    assert "- PROBLEM: boom" in er.section("client", ["x"], rows, ["boom"])


def test_requirement_strings_parse_back():
    # what extra_request hands pip must be valid requirements without the extra's marker
    full = er.extra_requirements(METADATA, "fms-accel-all")
    for text in er.extra_request(full):
        assert Requirement(text).marker is None

"""Every checked-in sample configuration passes `fms-acceleration check` with the plugins of
this repository installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fms_acceleration.cli import main

SAMPLES = Path(__file__).resolve().parents[3] / "sample-configurations"
CONTENTS = SAMPLES / "CONTENTS.yaml"

if not CONTENTS.is_file():  # installed outside the monorepo: nothing to check
    pytest.skip("sample-configurations/ is not beside this checkout", allow_module_level=True)

ENTRIES = yaml.safe_load(CONTENTS.read_text())["framework_configs"]


def test_contents_lists_every_sample_file():
    listed = sorted(entry["filename"] for entry in ENTRIES)
    on_disk = sorted(p.name for p in SAMPLES.glob("*-sample-configuration.yaml"))
    assert listed == on_disk
    assert len(listed) >= 6


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["shortname"] for e in ENTRIES])
def test_sample_passes_check(entry, capsys):
    path = SAMPLES / entry["filename"]
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    active = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(active) >= 1

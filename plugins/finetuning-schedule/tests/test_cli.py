"""`fms-acceleration gen-schedule` through the core CLI (entry point fms_acceleration.cli)."""

from __future__ import annotations

from importlib import metadata

import yaml

from fms_acceleration.cli import main
from fms_acceleration.testing import save_tiny_model
from fms_acceleration_fts.schedule import validate_schedule


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="fms_acceleration.cli")}
    assert eps.get("gen-schedule") == "fms_acceleration_fts.cli:register"


def test_gen_schedule_writes_default_schedule(tmp_path, h, capsys):
    model_dir = save_tiny_model(tmp_path / "model", num_hidden_layers=1, hidden_size=32,
                                intermediate_size=64)  # fmt: skip
    out = tmp_path / "sched.yaml"
    assert main(["gen-schedule", str(model_dir), "-o", str(out)]) == 0
    assert "wrote 6 phases for LlamaForCausalLM" in capsys.readouterr().out
    written = yaml.safe_load(out.read_text())
    reverse = list(reversed(h.NAMES))
    assert written == {i: {"params": reverse[2 * i : 2 * i + 2]} for i in range(6)}
    assert len(validate_schedule(written, h.NAMES)) == 6
    # a directory as -o gets the FTS file name; --phase-size groups more tensors
    assert main(["gen-schedule", str(model_dir), "-o", str(tmp_path), "--phase-size", "5"]) == 0
    written = yaml.safe_load((tmp_path / "LlamaForCausalLM_ft_schedule.yaml").read_text())
    assert [len(v["params"]) for v in written.values()] == [5, 5, 2]


def test_gen_schedule_bad_model_dir(tmp_path, capsys):
    assert main(["gen-schedule", str(tmp_path / "nothing"), "-o", str(tmp_path / "s.yaml")]) == 2
    assert "cannot read a model config" in capsys.readouterr().err

"""Two ranks (torchrun, gloo on CPU): the trial lives on rank 0, rank 1 follows it, and a prune
stops both ranks at the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

sys.path.insert(0, os.path.dirname(__file__))
from hpo_search_helpers import cli_env, train_flags, write_search_config


@pytest.mark.multiprocess
def test_a_forced_prune_stops_both_ranks_at_the_same_step(tmp_path, tiny_model, dataset):
    config = write_search_config(
        tmp_path / "hpo.yaml", {"type": "threshold", "upper": 0.0, "n_warmup_steps": 3}
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "fms_acceleration_hpo", str(config), "--trials", "1",
               "--storage", storage, "--study-name", "d", "--output-dir", str(tmp_path / "out"),
               *train_flags(tiny_model, dataset, max_steps=10)]  # fmt: skip
    proc = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[search] ")]
    assert any(line.startswith("[search] trial 0 PRUNED at step 4 |") for line in lines), lines
    assert any(line.startswith("[search] rank 1: trial pruned at step 4 (") for line in lines), (
        lines
    )
    (trial,) = optuna.load_study(study_name="d", storage=storage).get_trials()
    assert trial.state == TrialState.PRUNED and trial.user_attrs["pruned_at_step"] == 4
    assert sorted(trial.intermediate_values) == [2, 4]
    folder = tmp_path / "out" / "d_trial-0"
    # both ranks stopped at step 4 (otherwise the DDP collectives of step 5 would hang)
    state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert not (folder / "checkpoint-6").exists()

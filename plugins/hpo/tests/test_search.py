"""`fms-acceleration search` on a tiny model: pruning, kill and resume, table and plot, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from fms_acceleration.cli import main as cli_main
from fms_acceleration_hpo.search import SearchRequest, run_search

sys.path.insert(0, os.path.dirname(__file__))
from hpo_search_helpers import CLI, cli_env, train_flags, write_search_config


def _train_options(tiny_model, dataset, out, max_steps):
    return dict(
        output_dir=str(out), model=str(tiny_model), dataset=str(dataset), max_steps=max_steps,
        batch_size=4, seq_len=16, learning_rate=1e-3, target_modules=("q_proj", "v_proj"),
        eval_split=0.1, evaluate=False,
    )  # fmt: skip


def test_a_pruned_trial_stops_early_and_the_study_is_drawn(tmp_path, tiny_model, dataset):
    config = write_search_config(
        tmp_path / "hpo.yaml", {"type": "threshold", "upper": 0.0, "n_warmup_steps": 3}
    )
    lines: list[str] = []
    result = run_search(
        SearchRequest(
            config=str(config), trials=1, storage=f"sqlite:///{tmp_path / 'study.db'}",
            study_name="p", train_options=_train_options(tiny_model, dataset, tmp_path / "out", 8),
            plot=str(tmp_path / "study.png"), emit=lines.append,
        )
    )  # fmt: skip
    (trial,) = result.study.get_trials()
    # reported at 2 (warm-up), pruned at the evaluation of step 4, long before max_steps 8
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["pruned_at_step"] == 4
    assert sorted(trial.intermediate_values) == [2, 4]
    folder = tmp_path / "out" / "p_trial-0"
    assert trial.user_attrs["output_dir"] == str(folder)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((folder / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["max_steps"] == 8
    assert lines[-1] == (
        "[search] trial 0 PRUNED at step 4 | study: 0 complete, 1 pruned, 0 failed, 0 running, "
        "0 waiting | no complete trial yet"
    )
    header, _rule, row = result.table.splitlines()
    assert header.split() == ["trial", "state", "eval_loss", "steps", "learning_rate", "lora_r",
                              "retry_of", "seconds"]  # fmt: skip
    assert row.split()[:4] == ["0", "PRUNED", f"{trial.value:.4f}", "4"]
    png = (tmp_path / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def _trials(storage):
    return sorted(optuna.load_study(study_name="k", storage=storage).get_trials(),
                  key=lambda t: t.number)  # fmt: skip


@pytest.mark.slow
def test_a_killed_worker_resumes_its_trial_from_the_checkpoint(tmp_path, tiny_model, dataset):
    config = write_search_config(
        tmp_path / "hpo.yaml", {"type": "nop"}, eval_every=4, checkpoint_every=4
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [*CLI, str(config), "--trials", "2", "--storage", storage, "--study-name", "k",
               "--output-dir", str(tmp_path / "out"), "--plot", str(tmp_path / "study.png"),
               *train_flags(tiny_model, dataset, max_steps=24)]  # fmt: skip
    marker = tmp_path / "out" / "k_trial-1" / "checkpoint-4" / "trainer_state.json"
    worker = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not marker.is_file():
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "trial 1 never reached its step-4 checkpoint"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    before = _trials(storage)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]

    rerun = subprocess.run([*command, "--retry-running"], env=cli_env(), capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[search] trials whose process died, marked FAIL: [1]" in rerun.stdout
    assert (
        "[search] re-enqueued failed trials (same params, resume from their checkpoint): [1]"
        in (rerun.stdout)
    )
    after = _trials(storage)
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    kept, killed, retry = after
    assert (kept.value, kept.params, kept.datetime_complete, kept.intermediate_values) == (
        before[0].value, before[0].params, before[0].datetime_complete,
        before[0].intermediate_values,
    )  # fmt: skip
    assert retry.user_attrs["retry_of"] == 1 and retry.params == killed.params
    assert retry.user_attrs["output_dir"] == killed.user_attrs["output_dir"]
    # resumed from a checkpoint of step >= 4: the evaluations before it are not run again
    assert min(retry.intermediate_values) > 4 and max(retry.intermediate_values) == 24
    assert retry.user_attrs["steps"] == 24
    assert list((tmp_path).glob("study.backup-*.db")), "no backup of the study was made"
    table = rerun.stdout[rerun.stdout.index("trial  state") :].splitlines()
    assert [row.split()[:2] for row in table[2:5]] == [["0", "COMPLETE"], ["1", "FAIL"],
                                                      ["2", "COMPLETE"]]  # fmt: skip
    assert table[4].split()[-2] == "1"  # retry_of
    assert (tmp_path / "study.png").is_file()


def _search_error(capsys, *argv) -> str:
    assert cli_main(["search", *argv]) == 2
    return capsys.readouterr().err.strip()


def test_errors_name_the_flag_or_key(tmp_path, capsys, tiny_model, dataset):
    config = write_search_config(tmp_path / "hpo.yaml", {"type": "nop"})
    flags = train_flags(tiny_model, dataset, max_steps=4)
    common = ["--trials", "1", "--study-name", "e", "--output-dir", str(tmp_path / "out"), *flags]
    assert _search_error(capsys, str(config), "--storage", "redis://x", *common) == (
        "fms-acceleration search: error: --storage: 'redis://x' is not a storage URL; use "
        "sqlite:///FILE (one host), journal://FILE (one host, many processes) or "
        "postgresql://USER@HOST/DB (several hosts)"
    )
    storage = ["--storage", f"sqlite:///{tmp_path / 'e.db'}"]
    targeted = write_search_config(
        tmp_path / "fts.yaml", {"type": "nop"},
        search_space=[{"name": "lr", "type": "float", "low": 1e-6, "high": 1e-4,
                       "target": "training.finetuning_schedule.base_max_lr"}],
    )  # fmt: skip
    assert _search_error(capsys, str(targeted), *storage, *common) == (
        "fms-acceleration search: error: plugins.training.hpo.search_space[0].target: "
        "'training.finetuning_schedule.base_max_lr' is a key of the stanza "
        "plugins.training.finetuning_schedule, which the configuration does not have; add the "
        "stanza to tune one of its keys"
    )
    no_stanza = tmp_path / "none.yaml"
    no_stanza.write_text(
        "plugins:\n  training:\n    fused_ops_and_kernels:\n      fast_loss: true\n"
    )
    assert _search_error(capsys, str(no_stanza), *storage, *common) == (
        f"fms-acceleration search: error: {no_stanza}: no plugins.training.hpo stanza; the search "
        "reads its metric, sampler, pruner and search space from it (see "
        "sample-configurations/hpo-*.yaml)"
    )
    (tmp_path / "out" / "e_trial-0").mkdir(parents=True)
    assert _search_error(capsys, str(config), *storage, *common) == (
        f"fms-acceleration search: error: --output-dir {tmp_path / 'out'} already has trial "
        f"folders of a study named 'e' (e_trial-0), but sqlite:///{tmp_path / 'e.db'} has no "
        "trials of it: they would mix with this new study. Pass another --output-dir or "
        "--study-name, or move them away."
    )
    assert _search_error(capsys, str(config), *storage, *common[:-2], "--lora-r", "0") == (
        "fms-acceleration search: error: --lora-r: 0 must be greater than 0."
    )

"""Several worker processes on one study: unique trial numbers, the total respected, nothing
left RUNNING, no "database is locked" (sqlite, journal file, and a real PostgreSQL server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

sys.path.insert(0, os.path.dirname(__file__))
from postgres_server import postgres_cluster, why_unavailable

WORKER = Path(__file__).parent / "fake_worker.py"
TRIALS = 10


def _run_two_workers(url: str, root: Path) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), url, "study", str(TRIALS), str(root), str(worker)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in (1, 2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _check(url: str, root: Path) -> None:
    results = _run_two_workers(url, root)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "database is locked" not in result.stderr
    storage = url
    if url.startswith("journal://"):
        from fms_acceleration_hpo import StudyStorage

        storage = StudyStorage.parse(url).open()
    trials = optuna.load_study(study_name="study", storage=storage).get_trials()
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(TRIALS))  # unique, and exactly the total
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(len(t.intermediate_values) == 2 for t in trials)
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2  # both workers ran trials: they really shared the study


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_file_storage(tmp_path, kind):
    url = (
        f"sqlite:///{tmp_path / 'study.db'}"
        if kind == "sqlite"
        else f"journal://{tmp_path / 'study.log'}"
    )
    _check(url, tmp_path)


def test_two_workers_share_a_postgresql_server(tmp_path):
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with postgres_cluster() as url:
        _check(url, tmp_path)


def test_failures_timeout_and_a_retry_past_the_total(tmp_path):
    import time

    from fake_worker import OPTIONS

    from fms_acceleration_hpo import StudyStorage
    from fms_acceleration_hpo.worker import open_study, run_worker

    storage = StudyStorage.parse(f"sqlite:///{tmp_path / 'study.db'}")
    opened = open_study(storage, "t", OPTIONS, tmp_path)

    def objective(trial):
        x = trial.suggest_float("x", -1.0, 1.0)
        if trial.number == 0:
            raise RuntimeError("out of memory")
        return x

    # a failing trial does not stop the worker, nor count towards the total
    run_worker(opened, storage, "t", 3, objective)
    trials = opened.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[0].user_attrs["error"] == "RuntimeError: out of memory"

    # the next worker re-enqueues the failed trial with its params; it runs although the
    # total (3) is already reached, and nothing else does
    again = open_study(storage, "t", OPTIONS, tmp_path)
    assert again.resumed.retries == [0]
    seen = []
    run_worker(
        again, storage, "t", 3, lambda trial: seen.append(trial.suggest_float("x", -1, 1)) or 0.0
    )
    assert seen == [trials[0].params["x"]]
    retry = again.study.get_trials()[-1]
    assert retry.user_attrs["retry_of"] == 0 and retry.state == TrialState.COMPLETE

    # --timeout: no trial starts after it (each takes 0.3 s; 50 would take 15 s)
    def slow(trial):
        time.sleep(0.3)
        return trial.suggest_float("x", -1.0, 1.0)

    started = time.monotonic()
    run_worker(again, storage, "t", 55, slow, timeout=0.5)
    assert time.monotonic() - started < 10
    assert 1 <= len(again.study.get_trials()) - 5 < 50


def test_a_trial_that_always_fails_stops_after_as_many_failures_as_the_total(tmp_path):
    """Failures do not count towards the total (a retry takes their place), so without a cap a
    deterministic failure would start trials forever."""
    from fake_worker import OPTIONS

    from fms_acceleration_hpo import StudyStorage
    from fms_acceleration_hpo.worker import open_study, run_worker

    storage = StudyStorage.parse(f"sqlite:///{tmp_path / 'study.db'}")
    opened = open_study(storage, "t", OPTIONS, tmp_path)

    def objective(trial):
        trial.suggest_float("x", -1.0, 1.0)
        raise ValueError("--output-dir is a file")

    run_worker(opened, storage, "t", 3, objective, timeout=120)
    trials = opened.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert {t.user_attrs["error"] for t in trials} == {"ValueError: --output-dir is a file"}

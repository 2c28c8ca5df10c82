"""Resuming a study: keep finished trials, re-enqueue failed ones (and, when asked, the RUNNING
trials of dead processes) with the same parameters, so that each resumes from its checkpoint.

Each trial records the process that runs it (host, pid, process start time). A RUNNING trial of
this host whose process is gone is dead; RUNNING trials of other hosts are judged by optuna's
heartbeat on server storages (`fail_stale_trials`), and left alone otherwise.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

WORKER_ATTR = "worker"
OUTPUT_DIR_ATTR = "output_dir"
RETRY_OF_ATTR = "retry_of"


def this_process() -> dict[str, Any]:
    """The record a trial keeps of the process that runs it."""
    import psutil

    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "started": round(psutil.Process(pid).create_time(), 2),
    }


def process_is_alive(worker: Mapping[str, Any] | None) -> bool | None:
    """True or False for a process of this host; None when it cannot be told (another host,
    or no record)."""
    import psutil

    if not worker or worker.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(worker["pid"])).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, KeyError, ValueError):
        return False
    except psutil.AccessDenied:
        return True
    # a reused pid belongs to a process started at another time
    return abs(round(started, 2) - float(worker.get("started", started))) < 0.05


@dataclass
class ResumeReport:
    """What resuming did."""

    backup: str | None = None
    failed_running: list[int] = field(default_factory=list)  # dead RUNNING trials now FAIL
    retries: list[int] = field(default_factory=list)  # failed trials re-enqueued
    left_running: list[int] = field(default_factory=list)  # RUNNING, process alive or unknown

    def lines(self) -> list[str]:
        """Human-readable lines for the log."""
        out = []
        if self.backup:
            out.append(f"backed up the study to {self.backup}")
        if self.failed_running:
            out.append(f"trials whose process died, marked FAIL: {self.failed_running}")
        if self.retries:
            out.append(f"re-enqueued failed trials (same params, resume from their checkpoint): "
                       f"{self.retries}")  # fmt: skip
        if self.left_running:
            out.append(f"RUNNING trials left alone (process alive or on another host): "
                       f"{self.left_running}")  # fmt: skip
        return out


def _already_retried(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    return {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}


def fail_dead_running(study: optuna.Study) -> tuple[list[int], list[int]]:
    """Mark RUNNING trials whose process is dead as FAIL; (failed, left running)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # server storages with a heartbeat
    failed, left = [], []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if process_is_alive(trial.user_attrs.get(WORKER_ATTR)) is False:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial.number)
            except (ValueError, RuntimeError):  # finished meanwhile by its own worker
                continue
        else:
            left.append(trial.number)
    return failed, left


def resume_study(
    study: optuna.Study,
    failed_states: Sequence[TrialState] = (TrialState.FAIL,),
) -> ResumeReport:
    """Re-enqueue each failed trial not yet retried, with its params, `retry_of` = its number
    and its output folder; with RUNNING in `failed_states`, first fail the RUNNING trials whose
    process is dead. COMPLETE and PRUNED trials are kept as they are. Call under the study
    lock."""
    report = ResumeReport()
    if TrialState.RUNNING in failed_states:
        report.failed_running, report.left_running = fail_dead_running(study)
    else:
        report.left_running = [
            t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ]
    trials = study.get_trials(deepcopy=False)
    retried = _already_retried(trials)
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried:
            continue
        attrs = {RETRY_OF_ATTR: trial.number}
        if OUTPUT_DIR_ATTR in trial.user_attrs:
            attrs[OUTPUT_DIR_ATTR] = trial.user_attrs[OUTPUT_DIR_ATTR]
        study.enqueue_trial(dict(trial.params), user_attrs=attrs)
        report.retries.append(trial.number)
    return report

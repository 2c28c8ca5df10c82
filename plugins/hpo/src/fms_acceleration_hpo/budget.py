"""The study-wide trial total, respected by any number of workers.

`n_trials` of `Study.optimize` counts one worker's trials, so the total is capped with optuna's
MaxTrialsCallback, counting every trial that is not FAIL (a failed trial's retry takes its
place), until as many trials have failed as the total asks for. Counting and creating the next
trial must be one step, or two workers that finish at
the same time both start one more: the study lock is taken before each `ask` (before
`optimize`, then by the callback after each trial) and released by the objective as soon as its
trial exists. A trial enqueued for a retry is always run, even when the total is reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class TrialBudget:
    """Caps the study's trials at `n_trials`; hands the study lock from one trial to the next."""

    def __init__(self, n_trials: int, lock: Callable[[], contextlib.AbstractContextManager]):
        self.n_trials = n_trials
        self._cap = MaxTrialsCallback(n_trials, states=COUNTED)
        self._lock = lock
        self._held: contextlib.ExitStack | None = None

    def _acquire(self) -> None:
        if self._held is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self._lock())
            self._held = stack

    def release(self) -> None:
        """Let other workers count and start trials (the objective calls it first thing)."""
        if self._held is not None:
            held, self._held = self._held, None
            held.close()

    def _room(self, study: optuna.Study) -> bool:
        counted = study.get_trials(deepcopy=False, states=COUNTED)
        waiting = any(t.state == TrialState.WAITING for t in counted)
        return waiting or len(counted) < self.n_trials

    def start(self, study: optuna.Study) -> bool:
        """Take the lock for the first trial; False (lock released) when there is no room."""
        self._acquire()
        if self._room(study):
            return True
        self.release()
        return False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After each trial: take the lock for the next one, or stop the study."""
        self._acquire()
        if any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
            return  # a retry waits: run it
        if len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) >= self.n_trials:
            # failures are not counted (a retry takes their place), so a trial that fails the
            # same way every time would start new ones forever: as many as the total, and stop
            study.stop()
            self.release()
            return
        self._cap(study, trial)
        if not self._room(study):  # the cap stopped the study: no next trial to guard
            self.release()

    def __enter__(self) -> TrialBudget:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

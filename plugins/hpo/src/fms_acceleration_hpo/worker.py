"""One worker of a study, whatever its trials run: open the study (under the study lock: backup,
create or load, resume, sampler), then run trials until the study-wide total or the timeout.

`fms-acceleration search` runs training jobs as trials; tests run a fake objective through the
same code, so storage, locking, resume and the trial total are tested on their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .budget import TrialBudget
from .options import HPOOptions
from .report import ERROR_ATTR
from .resume import ResumeReport, resume_study
from .sampler_state import build_pruner, build_sampler, restore_sampler
from .storage import StudyStorage, create_or_load_study


@dataclass
class OpenedStudy:
    """A loaded study, where its sampler checkpoints go, and what opening it did."""

    study: optuna.Study
    sampler_root: Path
    resumed: ResumeReport
    notes: list[str] = field(default_factory=list)


def open_study(
    storage: StudyStorage,
    study_name: str,
    options: HPOOptions,
    output_root: str | Path,
    *,
    retry_running: bool = False,
    backup: bool = True,
    check: Callable[[optuna.Study], None] | None = None,
) -> OpenedStudy:
    """Back up, create or load, resume and give the study its sampler, under the study lock.

    The sampler of a study with trials is restored from its checkpoint when no other worker
    is running; with one
    running, a restored state would repeat that worker's suggestions, so this worker's sampler
    is seeded with seed + trials in the study instead.
    """
    notes: list[str] = []
    with storage.lock(study_name):
        copy = storage.backup() if backup else None
        study = create_or_load_study(
            storage,
            study_name,
            options.direction,
            build_sampler(options.sampler),
            build_pruner(options.pruner),
        )
        if check is not None:
            check(study)
        failed_states = (TrialState.FAIL,) + ((TrialState.RUNNING,) if retry_running else ())
        resumed = resume_study(study, failed_states)
        resumed.backup = str(copy) if copy else None
        sampler_root = storage.sampler_root(study_name, output_root)
        trials = study.get_trials(deepcopy=False)
        if not trials:
            # checkpoints left by an earlier study of this name do not belong to this one
            study.sampler = build_sampler(options.sampler)
            how = f"new sampler (seed {options.sampler.seed})"
        elif resumed.left_running:
            study.sampler = build_sampler(options.sampler, len(trials))
            how = f"new sampler (seed {options.sampler.seed} + {len(trials)} trials in the study)"
        else:
            finished = sum(t.state.is_finished() for t in trials)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                study.sampler, how = restore_sampler(sampler_root, options.sampler, finished)
            notes += [str(w.message) for w in caught]
    notes += [*resumed.lines(), f"sampler: {how}"]
    return OpenedStudy(study, sampler_root, resumed, notes)


def run_worker(
    opened: OpenedStudy,
    storage: StudyStorage,
    study_name: str,
    n_trials: int,
    objective: Callable[[optuna.Trial], float | None],
    *,
    timeout: float | None = None,
    callbacks: Sequence[Callable[[optuna.Study, Any], None]] = (),
) -> None:
    """Run trials until the study has `n_trials` (all workers together) or `timeout` passes.

    A failing trial is recorded as FAIL (its error in the `error` attribute) and the worker
    goes on; TrialPruned records PRUNED.
    """
    budget = TrialBudget(n_trials, lambda: storage.lock(study_name))

    def run(trial: optuna.Trial) -> float | None:
        budget.release()  # the trial exists: other workers may count and start theirs
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            trial.set_user_attr(ERROR_ATTR, f"{type(err).__name__}: {err}"[:300])
            raise

    with budget:
        if budget.start(opened.study):
            opened.study.optimize(
                run,
                timeout=timeout,
                callbacks=[budget, *callbacks],
                catch=(Exception,),
                gc_after_trial=True,
            )

"""What a search prints: one progress line per finished trial and the final table of trials."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from fms_acceleration.summary import format_table

from .framework_plugin_hpo import PRUNED_AT_ATTR
from .resume import RETRY_OF_ATTR

STEPS_ATTR = "steps"
ERROR_ATTR = "error"
_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_steps(trial: FrozenTrial) -> int | None:
    """Optimizer steps a finished trial ran (its prune step when pruned)."""
    return trial.user_attrs.get(PRUNED_AT_ATTR, trial.user_attrs.get(STEPS_ATTR))


def state_counts(trials: Sequence[FrozenTrial]) -> str:
    """'3 complete, 1 pruned, 0 failed, 1 running, 0 waiting'."""
    counts = Counter(t.state.name for t in trials)
    words = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    return ", ".join(f"{counts.get(s, 0)} {words.get(s, s.lower())}" for s in _ORDER)


def best_text(study: optuna.Study, metric: str) -> str:
    """'best eval_loss 1.2345 (trial 3)', or 'no complete trial yet'."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no complete trial yet"
    best = study.best_trial
    return f"best {metric} {best.value:.4f} (trial {best.number})"


def progress_line(study: optuna.Study, trial: FrozenTrial, metric: str) -> str:
    """One line for a finished trial: its outcome, the whole study's state counts, the best."""
    steps = trial_steps(trial)
    outcome = trial.state.name
    if trial.state == TrialState.COMPLETE:
        outcome += f" {metric} {trial.value:.4f}"
    if steps is not None:
        outcome += f" at step {steps}"
    if trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs:
        outcome += f" ({trial.user_attrs[ERROR_ATTR]})"
    trials = study.get_trials(deepcopy=False)
    return (
        f"[search] trial {trial.number} {outcome} | study: {state_counts(trials)} | "
        f"{best_text(study, metric)}"
    )


def progress_callback(metric: str, emit: Callable[[str], None] = print) -> Callable:
    """A study callback printing `progress_line` after each trial."""

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        emit(progress_line(study, trial, metric))

    return callback


def trials_table(study: optuna.Study, metric: str) -> str:
    """Every trial of the study: number, state, value, steps, params, retry_of, duration."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names: list[str] = []
    for trial in trials:
        names += [n for n in trial.params if n not in names]
    rows = []
    for trial in trials:
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append(
            (
                str(trial.number),
                trial.state.name,
                _value(trial.value),
                str(trial_steps(trial) if trial_steps(trial) is not None else "-"),
                *(_param(trial.params[n]) if n in trial.params else "-" for n in names),
                str(trial.user_attrs.get(RETRY_OF_ATTR, "-")),
                "-" if duration is None else f"{duration:.0f}",
            )
        )
    headers = ("trial", "state", metric, "steps", *names, "retry_of", "seconds")
    return format_table(headers, rows)

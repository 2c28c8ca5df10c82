"""FTSState: where a run is in its fine-tuning schedule, and the file checkpoints carry it in.

One dataclass holds everything the callback tracks between Trainer events (Fine-Tuning
Scheduler keeps the same in its `FTSState`). Its fields are declared once: the checkpoint file,
the copy kept in optimizer.pt, the restore on resume and the checks of a damaged file all follow
from them. Fields marked run-only live for one run and are never saved.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .param_groups import FTSTransitionError

STATE_FILE = "fts_state.json"
_RUN_ONLY = {"run_only": True}


@dataclass
class FTSState:
    """The schedule state of one run: depth, early stopping, best checkpoint, history."""

    depth: int = 0
    """the deepest phase thawed"""
    wait: int = 0
    """evaluations without improvement since early stopping's best score (or the last phase)"""
    epochs_checked: int = 0
    """completed epochs already checked against max_transition_epoch"""
    best_metric: float | None = None
    """best monitored value (strictly better): its checkpoint is the one restore_best loads"""
    best_checkpoint: str | None = None
    best_depth: int | None = None
    es_best: float | None = None
    """early stopping's best score, kept across phases (FTSEarlyStopping)"""
    pending: str | None = None
    """a transition decided at the end of a step, epoch or evaluation, applied at the next step"""
    transitions: list[dict[str, Any]] = field(default_factory=list)
    """one record per transition: depth, global_step, epoch, reason"""
    stopped: str | None = field(default=None, metadata=_RUN_ONLY)
    """why early stopping ended training"""
    pending_best: bool = field(default=False, metadata=_RUN_ONLY)
    """the best metric improved: the next checkpoint saved is the best one"""
    written: dict[str, str] = field(default_factory=dict, metadata=_RUN_ONLY)
    """schedule files written before step 0 (file name -> path)"""
    resume_dir: str | None = field(default=None, metadata=_RUN_ONLY)
    """the checkpoint the Trainer resumes from (recorded when it loads optimizer.pt)"""
    optimizer_loaded: bool = field(default=False, metadata=_RUN_ONLY)
    """the Trainer loaded a checkpoint's optimizer.pt into this run's optimizer"""
    from_optimizer: dict[str, Any] | None = field(default=None, metadata=_RUN_ONLY)
    """the copy of the saved state found in that optimizer.pt"""

    @classmethod
    def saved_fields(cls) -> tuple[str, ...]:
        """Names of the fields a checkpoint carries, in order."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get("run_only"))

    def to_checkpoint(self, n_phases: int, final_depth: int) -> dict[str, Any]:
        """The JSON-serializable checkpoint content: the saved fields and the schedule's shape."""
        saved = {name: copy.deepcopy(getattr(self, name)) for name in self.saved_fields()}
        return {"n_phases": n_phases, "final_depth": final_depth, **saved}

    def restore(self, saved: Mapping[str, Any], n_phases: int) -> None:
        """Take a checkpoint's saved fields, except depth (the callback thaws its way there);
        a key the checkpoint lacks keeps its current value."""
        if saved.get("n_phases") != n_phases:
            raise FTSTransitionError(
                f"the checkpoint was written with a {saved.get('n_phases')}-phase schedule but "
                f"this run's schedule has {n_phases} phases: resume with the same ft_schedule"
            )
        for name in self.saved_fields():
            if name != "depth" and name in saved:
                setattr(self, name, copy.deepcopy(saved[name]))


def _integer_keys() -> list[str]:
    # the counters a resume cannot do without: every int field, and the schedule's phase count
    return [f.name for f in fields(FTSState) if f.type == "int"] + ["n_phases"]


def read_state_file(path: str) -> dict[str, Any]:
    """A checkpoint's fts_state.json; a damaged file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FTSTransitionError(
            f"{path} is damaged ({type(err).__name__}: {err}): restore it from a good copy of the "
            "checkpoint, or delete it to resume from the copy of the schedule state kept in "
            "optimizer.pt"
        ) from None
    problems = [
        key
        for key in _integer_keys()
        if not isinstance(state, dict)
        or not isinstance(state.get(key), int)
        or isinstance(state.get(key), bool)
    ]
    if problems:
        raise FTSTransitionError(
            f"{path} is damaged: {', '.join(problems)} missing or not an integer; restore it "
            "from a good copy of the checkpoint, or delete it to resume from the copy of the "
            "schedule state kept in optimizer.pt"
        )
    return state


def write_state_file(path: str, content: Mapping[str, Any]) -> None:
    """Write checkpoint content (FTSState.to_checkpoint) as JSON."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(dict(content), fh, indent=2)

"""The schedule state in checkpoints: saving it, and resuming a run at the phase it had reached.

Every checkpoint gets `fts_state.json` (and optimizer.pt a copy in its first param group). On
`resume_from_checkpoint` the Trainer loads optimizer.pt into an optimizer that holds phase 0
only; a load-state-dict pre-hook (installed through accelerator.prepare_optimizer) first thaws
the saved phases and adds their groups, so the saved state fits.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from transformers import TrainerState, TrainingArguments

from .fts_state import STATE_FILE, read_state_file, write_state_file
from .param_groups import (
    PHASE_KEY,
    STATE_GROUP_KEY,
    FTSTransitionError,
    group_phases,
    raw_optimizer,
    sync_scheduler_lists,
)
from .phase_transitions import PhaseTransitions

logger = logging.getLogger(__name__)


class CheckpointState(PhaseTransitions):
    """Writes the schedule state into checkpoints and restores the phase on resume."""

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore counters from state_dict() output (depth is restored by restore_depth)."""
        self.state.restore(sd, len(self.phases))

    def _save_state(self, args: TrainingArguments, state: TrainerState, optimizer: Any) -> None:
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.state.pending_best:
            self.state.best_checkpoint = ckpt
            self.state.pending_best = False
        self._publish(optimizer)
        if state.is_world_process_zero and os.path.isdir(ckpt):
            write_state_file(os.path.join(ckpt, STATE_FILE), self.state_dict())

    def restore_depth(self, depth: int, optimizer: Any, scheduler: Any = None) -> None:
        """Thaw phases 1..depth and add their groups (before optimizer.pt is loaded; with a
        scheduler, also extend it, for a resume that has no scheduler.pt to load)."""
        if depth > self.final_depth:
            raise FTSTransitionError(
                f"the checkpoint is at phase {depth} but this run stops at phase "
                f"{self.final_depth} (max_depth): resume with the same schedule and max_depth"
            )
        for d in range(self.state.depth + 1, depth + 1):
            reinit = self._scheduler_reinit(d)
            if reinit is not None:
                raise FTSTransitionError(
                    f"cannot resume past phase {d}: it reinitializes the LR scheduler "
                    f"({reinit.lr_scheduler_init.class_path}) and the Trainer loads scheduler.pt "
                    "into its own scheduler class first; resume from a checkpoint before that phase"
                )
            self._thaw(d)
            self._add_phase_on_resume(d, optimizer, scheduler)
            self.state.depth = d

    def _load_pre_hook(self, optimizer: Any, state_dict: dict[str, Any]) -> None:
        self.state.optimizer_loaded = True
        saved = state_dict.get("param_groups", [])
        phases = [g.get(PHASE_KEY, 0) for g in saved]
        depth = max(phases) if phases else 0
        if saved and STATE_GROUP_KEY in saved[0]:
            self.state.from_optimizer = json.loads(saved[0][STATE_GROUP_KEY])
        if depth > self.state.depth:
            self.restore_depth(depth, optimizer)
        self._tag_groups(optimizer)
        mine = [len(g["params"]) for g in optimizer.param_groups]
        theirs = [len(g["params"]) for g in saved]
        if mine != theirs:
            raise FTSTransitionError(
                f"optimizer checkpoint has param groups of sizes {theirs} but phases 0..{depth} of "
                f"this schedule give {mine}: resume with the same model and ft_schedule"
            )

    def install_resume_hook(self, optimizer: Any) -> None:
        """Register the hook that restores the depth when the Trainer loads optimizer.pt."""
        raw = raw_optimizer(optimizer)
        if id(raw) in self._hooked_optimizers:
            return
        raw.register_load_state_dict_pre_hook(self._load_pre_hook)
        self._hooked_optimizers.add(id(raw))

    def _resume(self, args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any):
        run = self.state
        ckpt = run.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(ckpt, STATE_FILE)
        saved = None
        if os.path.isfile(path):
            saved = read_state_file(path)
        elif run.from_optimizer is not None:
            saved = run.from_optimizer
            if run.resume_dir is not None:
                logger.warning(
                    "fine-tuning schedule: %s is missing; using the copy of the schedule state "
                    "kept in optimizer.pt",
                    path,
                )
        partial = []
        if not run.optimizer_loaded:
            partial.append("its optimizer state (optimizer.pt and scheduler.pt) was not loaded")
        if saved is None:
            partial.append(f"it has no schedule state ({path} is missing)")
        if partial:
            what = " and ".join(partial)
            if not self.config.allow_partial_resume:
                raise FTSTransitionError(
                    f"cannot resume the fine-tuning schedule at step {state.global_step} from "
                    f"{ckpt}: {what}. Resume from a complete checkpoint, or set "
                    "allow_partial_resume: true to continue anyway (fresh optimizer state; "
                    "without schedule state the schedule restarts at phase 0)"
                )
            logger.warning(
                "fine-tuning schedule: partial resume (allow_partial_resume) from %s: %s",
                ckpt,
                what,
            )
        depth = max(group_phases(optimizer))
        if saved is not None:
            self.load_state_dict(saved)
            if run.optimizer_loaded and saved["depth"] != depth:
                raise FTSTransitionError(
                    f"{path} says phase {saved['depth']} but optimizer.pt holds phases "
                    f"0..{depth}: the checkpoint is inconsistent"
                )
            depth = saved["depth"]
        if depth > run.depth:  # optimizer.pt was not loaded: rebuild groups (and scheduler) now
            self.restore_depth(depth, optimizer, scheduler)
        sync_scheduler_lists(scheduler, len(optimizer.param_groups))
        self._check_epoch_transition(state)

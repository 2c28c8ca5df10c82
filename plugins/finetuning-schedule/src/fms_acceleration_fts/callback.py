"""TrainerCallback that drives a fine-tuning schedule through a transformers.Trainer run.

Thaws phases, grows the optimizer's param groups and the LR scheduler, applies early stopping
(FTSEarlyStopping: one best score for the whole run), restores the best checkpoint at
transitions, and saves / restores its own state in checkpoints. A transition decided at the end
of a step, an epoch or an evaluation takes effect when the next step (or epoch) begins, as FTS
transitions at the start of the next epoch: the Trainer has then stepped its schedulers
(ReduceLROnPlateau included) and saved its checkpoint for the phase that ended. It uses a
strategy adapter for every parameter name; it never imports the framework.

This module is the Trainer's view only: which event does what. The work is done by the layers
in callback_base's docstring; the run's state is one FTSState (`callback.state`).
"""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callback_base import ScheduleFiles, decay_parameter_names
from .param_groups import epoch_end
from .phase_transitions import load_checkpoint_weights
from .train_start import TrainStart

__all__ = [
    "FinetuningScheduleCallback",
    "ScheduleFiles",
    "decay_parameter_names",
    "load_checkpoint_weights",
]


class FinetuningScheduleCallback(TrainStart, TrainerCallback):
    """Runs a validated schedule: one phase thawed at a time, param groups added as it goes."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ):
        self._start(args, state, kw.get("optimizer"), kw.get("lr_scheduler"))

    def on_epoch_begin(self, args, state, control, **kw):
        self._apply_pending(state, kw)

    def on_step_begin(self, args, state, control, **kw):
        self._apply_pending(state, kw)

    def on_step_end(self, args, state, control, **kw):
        self._check_step_transition(state)

    def on_epoch_end(self, args, state, control, **kw):
        epoch_end(kw.get("lr_scheduler"))
        self._check_epoch_transition(state)
        self._publish(kw.get("optimizer"))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.adapter.on_before_optimizer_step(self.model)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self._record_evaluation(metrics or {}, control)
        self._publish(kw.get("optimizer"))

    def on_save(self, args, state, control, **kw):
        self._save_state(args, state, kw.get("optimizer"))

"""When the next phase begins, and what happens then.

A transition is requested by a phase's max_transition_epoch / max_transition_step or by early
stopping running out of patience (FTSEarlyStopping: one best score for the whole run), and is
applied when the next step begins: maybe restore the best checkpoint, thaw the phase, add it to
the optimizer. In the final phase early stopping ends training instead.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from transformers import TrainerControl, TrainerState

from .param_groups import FTSTransitionError, load_group_states
from .reinitialization import Reinitialization

logger = logging.getLogger(__name__)


class PhaseTransitions(Reinitialization):
    """Requests, applies and records phase transitions; runs early stopping."""

    def transition(self, optimizer: Any, scheduler: Any, state: TrainerState, reason: str) -> None:
        """Move to the next phase: maybe restore the best checkpoint, thaw, add param groups."""
        run = self.state
        run.pending = None
        if run.depth >= self.final_depth:
            return
        if self.config.restore_best:
            self._restore_best(optimizer)
        new_depth = run.depth + 1
        self._thaw(new_depth)
        self._grow_optimizer(new_depth, optimizer, scheduler)
        run.depth = new_depth
        run.wait = 0
        run.transitions.append(
            {
                "depth": new_depth,
                "global_step": state.global_step,
                "epoch": state.epoch,
                "reason": reason,
            }
        )
        logger.info(
            "fine-tuning schedule: phase %d begins at step %d (epoch %.2f, %s): %d tensors thawed",
            new_depth,
            state.global_step,
            state.epoch or 0.0,
            reason,
            len(self.phases[new_depth].params),
        )
        self._publish(optimizer)

    def _request(self, reason: str) -> None:
        if self.state.pending is None and self.state.depth < self.final_depth:
            self.state.pending = reason

    def _apply_pending(self, state: TrainerState, kw: dict[str, Any]) -> None:
        if self.state.pending is not None:
            self.transition(kw["optimizer"], kw.get("lr_scheduler"), state, self.state.pending)

    def _check_epoch_transition(self, state: TrainerState) -> None:
        completed = math.floor((state.epoch or 0.0) + 1e-6)
        if completed <= self.state.epochs_checked:
            return
        self.state.epochs_checked = completed
        mte = self.phases[self.state.depth].max_transition_epoch
        if 0 <= mte <= completed:
            self._request(f"max_transition_epoch {mte} reached")

    def _check_step_transition(self, state: TrainerState) -> None:
        if self.config.epoch_transitions_only:
            return
        mts = self.phases[self.state.depth].max_transition_step
        if 0 <= mts <= state.global_step:
            self._request(f"max_transition_step {mts} reached")

    # ------------------------------------------------------------------ early stopping
    def _record_evaluation(self, metrics: dict[str, Any], control: TrainerControl) -> None:
        """Track the best metric (for restore_best) and run early stopping on an evaluation."""
        value = _metric(metrics, self.config.monitor)
        if value is None:
            available = ", ".join(sorted(metrics)) or "none"
            message = (
                f"early stopping monitors {self.config.monitor!r}, which is not among the "
                f"evaluation metrics ({available}); set early_stopping.monitor to one of them"
            )
            if self.config.strict:
                raise FTSTransitionError(
                    message + " (or early_stopping.strict: false to train on without it)"
                )
            self._warn_once("monitor", f"fine-tuning schedule: {message}")
            return
        run = self.state
        if self._better(value, run.best_metric, 0.0):
            run.best_metric = value
            run.best_depth = run.depth
            run.pending_best = True
        if not self.config.epoch_transitions_only:
            self._early_stopping(value, control)

    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if than is None:
            return not math.isnan(value)
        if self.config.mode == "min":
            return value + margin < than
        return value - margin > than

    def _early_stopping(self, value: float, control: TrainerControl) -> None:
        """FTSEarlyStopping._evaluate_stopping_criteria, with one best score for the whole run."""
        cfg, run = self.config, self.state
        monitor = cfg.monitor
        best = "none yet" if run.es_best is None else f"{run.es_best:.3f}"
        reason = None
        if cfg.check_finite and not math.isfinite(value):
            reason = f"monitored metric {monitor} = {value} is not finite (best so far {best})"
        elif cfg.stopping_threshold is not None and self._better(value, cfg.stopping_threshold, 0):
            reason = (
                f"stopping threshold reached: {monitor} = {value} "
                f"(threshold {cfg.stopping_threshold})"
            )
        elif cfg.divergence_threshold is not None and self._better(
            cfg.divergence_threshold, value, 0
        ):
            reason = (
                f"divergence threshold reached: {monitor} = {value} "
                f"(threshold {cfg.divergence_threshold})"
            )
        elif self._better(value, run.es_best, cfg.min_delta):
            run.es_best = value
            run.wait = 0
        else:
            run.wait += 1
            if run.wait >= cfg.patience:
                if run.depth >= self.final_depth:
                    reason = (
                        f"{monitor} did not improve in the last {run.wait} evaluations in the "
                        f"final phase {run.depth} (best {best})"
                    )
                else:
                    run.wait = 0
                    self._request("early stopping")
        if reason is not None:
            run.stopped = reason
            logger.info("fine-tuning schedule: %s; stopping training", reason)
            control.should_training_stop = True

    # ------------------------------------------------------------------ restore_best
    def _restore_best(self, optimizer: Any) -> None:
        ckpt = self.state.best_checkpoint
        if not ckpt or not os.path.isdir(ckpt):
            logger.warning(
                "restore_best: no best checkpoint saved yet; keeping the current weights"
            )
            return
        load_checkpoint_weights(self.model, ckpt, self.adapter)
        restored = "weights"
        optimizer_file = os.path.join(ckpt, "optimizer.pt")
        if os.path.isfile(optimizer_file) and optimizer is not None:
            saved = torch.load(optimizer_file, map_location="cpu", weights_only=True)
            problem = load_group_states(optimizer, saved)
            if problem is None:
                restored = "weights and optimizer state"
            else:
                logger.warning(
                    "restore_best: the optimizer state of %s is not restored: %s", ckpt, problem
                )
        logger.info(
            "restore_best: restored %s of %s (depth %s)", restored, ckpt, self.state.best_depth
        )


def _metric(metrics: dict[str, Any], monitor: str) -> float | None:
    for key in (monitor, f"eval_{monitor}"):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


def load_checkpoint_weights(model: torch.nn.Module, ckpt: str, adapter: Any) -> None:
    """Load the weights saved in a Trainer checkpoint directory into model (plain or peft)."""
    from safetensors.torch import load_file

    adapter_file = os.path.join(ckpt, "adapter_model.safetensors")
    model_file = os.path.join(ckpt, "model.safetensors")
    if os.path.isfile(adapter_file) and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        sd = adapter.before_restore_model(load_file(adapter_file))
        result = set_peft_model_state_dict(model, sd)
        if result.unexpected_keys:
            raise FTSTransitionError(
                f"restore_best: {ckpt} has unexpected keys {result.unexpected_keys[:3]}"
            )
        return
    if not os.path.isfile(model_file):
        raise FTSTransitionError(
            f"restore_best: {ckpt} has no model.safetensors or adapter_model.safetensors"
        )
    sd = adapter.before_restore_model(load_file(model_file))
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise FTSTransitionError(
            f"restore_best: {ckpt} has unexpected keys {result.unexpected_keys[:3]}"
        )

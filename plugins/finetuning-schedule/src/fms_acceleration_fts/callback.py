"""TrainerCallback that drives a fine-tuning schedule through a transformers.Trainer run.

Thaws phases, grows the optimizer's param groups and the LR scheduler, applies early stopping
per phase, restores the best checkpoint at transitions, and saves / restores its own state in
checkpoints. It uses a strategy adapter for every parameter name; it never imports the framework.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names

from .fts_config import FTSConfig
from .param_groups import (
    PHASE_KEY,
    FTSTransitionError,
    add_phase_groups,
    check_scheduler,
    group_phases,
    phase_groups,
    raw_optimizer,
    rebase_scheduler,
    reinit_optimizer,
    reinit_scheduler,
    sync_scheduler_lists,
    tag_phase,
)
from .schedule import Phase, final_depth, write_schedule

logger = logging.getLogger(__name__)

STATE_FILE = "fts_state.json"
STATE_GROUP_KEY = "fts_state"  # copy of the callback state kept in param group 0 of optimizer.pt


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names that get weight decay, by the same rule as Trainer.get_decay_parameter_names."""
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))


class FinetuningScheduleCallback(TrainerCallback):
    """Runs a validated schedule: one phase thawed at a time, param groups added as it goes."""

    def __init__(
        self,
        model: torch.nn.Module,
        phases: Sequence[Phase],
        adapter: Any,
        config: FTSConfig,
        generated_schedule: dict | None = None,
    ) -> None:
        self.model = model
        self.phases = list(phases)
        self.adapter = adapter
        self.config = config
        self.generated_schedule = generated_schedule
        self.final_depth = final_depth(self.phases, config.max_depth)
        self.depth = 0
        self.best_metric: float | None = None  # best monitored value of the whole run
        self.best_checkpoint: str | None = None
        self.best_depth: int | None = None
        self.phase_best: float | None = None  # early stopping, reset at each transition
        self.wait = 0
        self.epochs_checked = 0
        self.transitions: list[dict[str, Any]] = []
        self._pending_best = False
        self._warned_monitor = False
        self._weight_decay = config.weight_decay
        self._hooked_optimizers: set[int] = set()
        self._restored_from_optimizer: dict | None = None

    # ------------------------------------------------------------------ parameters
    def _named_actual(self, logical: Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
        # one logical -> actual map per call (actual_param_name would rebuild it for every name)
        mapping = self.adapter.logical_name_map(self.model)
        params = dict(self.model.named_parameters())
        out = []
        for name in logical:
            actual = mapping.get(name) or self.adapter.actual_param_name(name, self.model)
            out.append((actual, params[actual]))
        return out

    def freeze_to_phase(self, depth: int = 0) -> None:
        """Freeze every parameter, then thaw phases 0..depth (the state a run starts from)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for d in range(depth + 1):
            for _, p in self._named_actual(self.phases[d].params):
                p.requires_grad_(True)

    def thawed_names(self) -> list[str]:
        """Logical names of the parameters that currently require grad, in model order."""
        return [n for n, p in self.adapter.named_parameters(self.model) if p.requires_grad]

    def _phase_lr(self, depth: int) -> float:
        lr = self.phases[depth].lr
        return self.config.base_max_lr if lr is None else lr

    def _groups_for(self, depth: int, lr: float | None = None) -> list[dict[str, Any]]:
        named = self._named_actual(self.phases[depth].params)
        return phase_groups(
            named,
            decay_parameter_names(self.model),
            depth,
            self._phase_lr(depth) if lr is None else lr,
            self._weight_decay,
        )

    # ------------------------------------------------------------------ transitions
    def _thaw(self, depth: int) -> list[torch.nn.Parameter]:
        params = [p for _, p in self._named_actual(self.phases[depth].params)]
        for p in params:
            p.requires_grad_(True)
        self.adapter.on_params_thawed(self.model, params)
        return params

    def _grow_optimizer(self, depth: int, optimizer: Any, scheduler: Any) -> None:
        phase = self.phases[depth]
        if phase.new_optimizer is None:
            add_phase_groups(optimizer, scheduler, self._groups_for(depth))
        else:
            init = phase.new_optimizer
            opt_lr = init.init_args.get("lr")
            groups: list[dict[str, Any]] = []
            for d in range(depth + 1):
                if d == 0:
                    base = [g for g in optimizer.param_groups if g.get(PHASE_KEY) == 0]
                    lr0 = opt_lr if opt_lr is not None else base[0].get("initial_lr", base[0]["lr"])
                    groups += self._groups_for(0, lr=lr0)
                else:
                    groups += self._groups_for(d, lr=opt_lr)
            for g in groups:
                g.pop("initial_lr", None)
            reinit_optimizer(optimizer, init.resolve(), dict(init.init_args), groups)
            if phase.new_lr_scheduler is None:
                rebase_scheduler(scheduler, optimizer)
        if phase.new_lr_scheduler is not None:
            init = phase.new_lr_scheduler
            reinit_scheduler(scheduler, optimizer, init.resolve(), dict(init.init_args))

    def transition(self, optimizer: Any, scheduler: Any, state: TrainerState, reason: str) -> None:
        """Move to the next phase: maybe restore the best checkpoint, thaw, add param groups."""
        if self.depth >= self.final_depth:
            return
        if self.config.restore_best:
            self._restore_best()
        new_depth = self.depth + 1
        self._thaw(new_depth)
        self._grow_optimizer(new_depth, optimizer, scheduler)
        self.depth = new_depth
        self.phase_best = None
        self.wait = 0
        self.transitions.append(
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

    def _restore_best(self) -> None:
        ckpt = self.best_checkpoint
        if not ckpt or not os.path.isdir(ckpt):
            logger.warning(
                "restore_best: no best checkpoint saved yet; keeping the current weights"
            )
            return
        load_checkpoint_weights(self.model, ckpt, self.adapter)
        logger.info("restore_best: restored weights of %s (depth %s)", ckpt, self.best_depth)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable schedule state (depth, best checkpoint, early stopping, history)."""
        return {
            "depth": self.depth,
            "final_depth": self.final_depth,
            "n_phases": len(self.phases),
            "best_metric": self.best_metric,
            "best_checkpoint": self.best_checkpoint,
            "best_depth": self.best_depth,
            "phase_best": self.phase_best,
            "wait": self.wait,
            "epochs_checked": self.epochs_checked,
            "transitions": list(self.transitions),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore counters from state_dict() output (depth is restored by restore_depth)."""
        if sd.get("n_phases") != len(self.phases):
            raise FTSTransitionError(
                f"the checkpoint was written with a {sd.get('n_phases')}-phase schedule but this "
                f"run's schedule has {len(self.phases)} phases: resume with the same ft_schedule"
            )
        for key in (
            "best_metric",
            "best_checkpoint",
            "best_depth",
            "phase_best",
            "wait",
            "epochs_checked",
        ):
            setattr(self, key, sd.get(key, getattr(self, key)))
        self.transitions = list(sd.get("transitions", []))

    def _publish(self, optimizer: Any) -> None:
        # optimizer.pt then carries the state too, so resuming from a copied checkpoint works
        if optimizer is not None and optimizer.param_groups:
            optimizer.param_groups[0][STATE_GROUP_KEY] = json.dumps(self.state_dict())

    def restore_depth(self, depth: int, optimizer: Any) -> None:
        """Thaw phases 1..depth and add their groups (before optimizer.pt is loaded)."""
        if depth > self.final_depth:
            raise FTSTransitionError(
                f"the checkpoint is at phase {depth} but this run stops at phase "
                f"{self.final_depth} (max_depth): resume with the same schedule and max_depth"
            )
        for d in range(self.depth + 1, depth + 1):
            phase = self.phases[d]
            if phase.new_lr_scheduler is not None:
                raise FTSTransitionError(
                    f"cannot resume past phase {d}: it reinitializes the LR scheduler "
                    f"({phase.new_lr_scheduler.class_path}) and the Trainer loads scheduler.pt "
                    "into its own scheduler class first; resume from a checkpoint before that phase"
                )
            self._thaw(d)
            if phase.new_optimizer is not None:
                self._grow_optimizer_for_resume(d, optimizer)
            else:
                for g in self._groups_for(d):
                    optimizer.add_param_group(g)
            self.depth = d

    def _grow_optimizer_for_resume(self, depth: int, optimizer: Any) -> None:
        # same groups as the live reinitialization; lrs and state come from optimizer.pt
        groups = []
        for d in range(depth + 1):
            groups += self._groups_for(d)
        for g in groups:
            g.pop("initial_lr", None)
        init = self.phases[depth].new_optimizer
        reinit_optimizer(optimizer, init.resolve(), dict(init.init_args), groups)

    def _load_pre_hook(self, optimizer: Any, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("param_groups", [])
        phases = [g.get(PHASE_KEY, 0) for g in saved]
        depth = max(phases) if phases else 0
        if saved and STATE_GROUP_KEY in saved[0]:
            self._restored_from_optimizer = json.loads(saved[0][STATE_GROUP_KEY])
        if depth > self.depth:
            self.restore_depth(depth, optimizer)
        tag_phase(optimizer, 0)
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

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ):
        optimizer, scheduler = kw.get("optimizer"), kw.get("lr_scheduler")
        self._weight_decay = args.weight_decay
        if optimizer is None:
            raise FTSTransitionError("the fine-tuning schedule needs the Trainer's optimizer")
        check_scheduler(scheduler)
        tag_phase(optimizer, 0)
        if state.global_step == 0:
            self._check_phase0(optimizer)
            if self.generated_schedule is not None and state.is_world_process_zero:
                path = os.path.join(args.output_dir, default_schedule_file(self.model))
                write_schedule(self.generated_schedule, path)
                logger.info("fine-tuning schedule: generated default schedule written to %s", path)
        else:
            self._resume(args, state, optimizer, scheduler)
        self._publish(optimizer)

    def _check_phase0(self, optimizer: Any) -> None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        phase0 = {id(p) for _, p in self._named_actual(self.phases[0].params)}
        if in_opt != phase0:
            raise FTSTransitionError(
                f"the optimizer holds {len(in_opt)} tensors but phase 0 has {len(phase0)}: "
                "something changed requires_grad after the plugin froze the model to phase 0"
            )

    def _resume(self, args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any):
        saved = None
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                saved = json.load(fh)
        elif self._restored_from_optimizer is not None:
            saved = self._restored_from_optimizer
        else:
            logger.warning(
                "fine-tuning schedule: no saved schedule state found; early-stopping reset"
            )
        depth = max(group_phases(optimizer))
        if saved is not None:
            self.load_state_dict(saved)
            if saved["depth"] != depth:
                raise FTSTransitionError(
                    f"{STATE_FILE} says phase {saved['depth']} but optimizer.pt holds phases "
                    f"0..{depth}: the checkpoint is inconsistent"
                )
        if depth > self.depth:  # optimizer.pt was not loaded (e.g. missing): rebuild groups now
            self.restore_depth(depth, optimizer)
        self._resume_scheduler(optimizer, scheduler)
        self._check_epoch_transition(state, optimizer, scheduler)

    def _resume_scheduler(self, optimizer: Any, scheduler: Any) -> None:
        # scheduler.pt gave base_lrs for every group; the lambdas of added groups are not saved
        sync_scheduler_lists(scheduler, len(optimizer.param_groups))

    def _check_epoch_transition(self, state: TrainerState, optimizer: Any, scheduler: Any) -> None:
        completed = math.floor((state.epoch or 0.0) + 1e-6)
        if completed <= self.epochs_checked:
            return
        self.epochs_checked = completed
        mte = self.phases[self.depth].max_transition_epoch
        if 0 <= mte <= completed and self.depth < self.final_depth:
            self.transition(optimizer, scheduler, state, f"max_transition_epoch {mte} reached")
        self._publish(optimizer)

    def on_step_end(self, args, state, control, **kw):
        if self.config.epoch_transitions_only or self.depth >= self.final_depth:
            return
        mts = self.phases[self.depth].max_transition_step
        if 0 <= mts <= state.global_step:
            self.transition(
                kw["optimizer"], kw.get("lr_scheduler"), state, f"max_transition_step {mts} reached"
            )

    def on_epoch_end(self, args, state, control, **kw):
        self._check_epoch_transition(state, kw["optimizer"], kw.get("lr_scheduler"))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.adapter.on_before_optimizer_step(self.model)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        value = _metric(metrics or {}, self.config.monitor)
        if value is None:
            if not self._warned_monitor:
                logger.warning(
                    "fine-tuning schedule: monitored metric %r not in evaluation metrics %s",
                    self.config.monitor,
                    sorted(metrics or {}),
                )
                self._warned_monitor = True
            return
        sign = 1.0 if self.config.mode == "min" else -1.0
        if self.best_metric is None or sign * (value - self.best_metric) < 0:
            self.best_metric = value
            self.best_depth = self.depth
            self._pending_best = True
        if self.phase_best is None or sign * (value - self.phase_best) < -self.config.min_delta:
            self.phase_best = value
            self.wait = 0
        else:
            self.wait += 1
        optimizer = kw.get("optimizer")
        if not self.config.epoch_transitions_only and self.wait >= self.config.patience:
            if self.depth < self.final_depth:
                self.transition(optimizer, kw.get("lr_scheduler"), state, "early stopping")
            else:
                logger.info(
                    "fine-tuning schedule: early stopping in the final phase %d", self.depth
                )
                control.should_training_stop = True
        self._publish(optimizer)

    def on_save(self, args, state, control, **kw):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._pending_best:
            self.best_checkpoint = ckpt
            self._pending_best = False
        self._publish(kw.get("optimizer"))
        if state.is_world_process_zero and os.path.isdir(ckpt):
            with open(os.path.join(ckpt, STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(self.state_dict(), fh, indent=2)


def _metric(metrics: dict[str, Any], monitor: str) -> float | None:
    for key in (monitor, f"eval_{monitor}"):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


def default_schedule_file(model: torch.nn.Module) -> str:
    """`<ModelClass>_ft_schedule.yaml` for the (unwrapped, base) model class."""
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    return f"{type(base).__name__}_ft_schedule.yaml"


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

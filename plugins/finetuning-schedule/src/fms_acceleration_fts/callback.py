"""TrainerCallback that drives a fine-tuning schedule through a transformers.Trainer run.

Thaws phases, grows the optimizer's param groups and the LR scheduler, applies early stopping
(FTSEarlyStopping: one best score for the whole run), restores the best checkpoint at
transitions, and saves / restores its own state in checkpoints. A transition decided at the end
of a step, an epoch or an evaluation takes effect when the next step (or epoch) begins, as FTS
transitions at the start of the next epoch: the Trainer has then stepped its schedulers
(ReduceLROnPlateau included) and saved its checkpoint for the phase that ended. It uses a
strategy adapter for every parameter name; it never imports the framework.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names

from .fts_config import FTSConfig
from .param_groups import (
    DECAY_KEY,
    PHASE_KEY,
    STATE_GROUP_KEY,
    FTSTransitionError,
    add_phase_groups,
    check_scheduler,
    decay_weight_decay,
    epoch_end,
    extend_scheduler,
    group_phases,
    load_group_states,
    new_group_lr,
    phase_groups,
    raw_optimizer,
    rebuild_groups,
    reinit_optimizer,
    reinit_scheduler,
    start_lrs,
    sync_scheduler_lists,
    without_owned,
)
from .reinit_checks import check_group_counts, scheduler_init_args
from .schedule import (
    ClassInit,
    FTSScheduleError,
    Phase,
    default_schedule_filename,
    dump_schedule,
    final_depth,
    write_new_file,
)

logger = logging.getLogger(__name__)

STATE_FILE = "fts_state.json"
_STATE_TYPES = {"depth": int, "n_phases": int, "wait": int, "epochs_checked": int}


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names that get weight decay, by the same rule as Trainer.get_decay_parameter_names."""
    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [torch.nn.LayerNorm], forbidden))


@dataclass(frozen=True)
class ScheduleFiles:
    """What the callback writes to log_dir before step 0 (FTS's schedule artifacts)."""

    schedule: dict  # the schedule as given (or generated), phase keys as integers
    generated: bool = False  # the default schedule: written so the user can edit it
    keys_converted: bool = False  # string phase keys: also written as `_ft_schedule_valid`


class FinetuningScheduleCallback(TrainerCallback):
    """Runs a validated schedule: one phase thawed at a time, param groups added as it goes."""

    def __init__(
        self,
        model: torch.nn.Module,
        phases: Sequence[Phase],
        adapter: Any,
        config: FTSConfig,
        files: ScheduleFiles | None = None,
    ) -> None:
        self.model = model
        self.phases = list(phases)
        self.adapter = adapter
        self.config = config
        self.files = files
        self.final_depth = final_depth(self.phases, config.max_depth)
        self.depth = 0
        self.best_metric: float | None = None  # best monitored value (strictly better): checkpoint
        self.best_checkpoint: str | None = None
        self.best_depth: int | None = None
        self.es_best: float | None = None  # early stopping's best score, kept across phases
        self.wait = 0
        self.epochs_checked = 0
        self.pending: str | None = None  # transition decided, applied at the next step begin
        self.stopped: str | None = None  # why early stopping ended training
        self.transitions: list[dict[str, Any]] = []
        self.written: dict[str, str] = {}  # schedule files written before step 0
        self.resume_dir: str | None = None  # set by the plugin when the Trainer loads a checkpoint
        self._pending_best = False
        self._warned: set[str] = set()
        self._decay_names = decay_parameter_names(model)
        self._hooked_optimizers: set[int] = set()
        self._restored_from_optimizer: dict | None = None
        self._optimizer_loaded = False

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
        self._set_batchnorm_tracking(depth)

    def thawed_names(self) -> list[str]:
        """Logical names of the parameters that currently require grad, in model order."""
        return [n for n, p in self.adapter.named_parameters(self.model) if p.requires_grad]

    def _set_batchnorm_tracking(self, depth: int) -> None:
        # FTS (frozen_bn_track_running_stats: false): a frozen BatchNorm stops updating its
        # running statistics until the phase that holds its parameters thaws.
        if self.config.frozen_bn_track_running_stats:
            return
        phase_of = {n: d for d, ph in enumerate(self.phases) for n in ph.params}
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                own = [
                    f"{name}.{pn}" if name else pn
                    for pn, _ in module.named_parameters(recurse=False)
                ]
                depths = [phase_of.get(self.adapter.logical_param_name(a)) for a in own]
                depths = [d for d in depths if d is not None]
                module.track_running_stats = bool(depths) and min(depths) <= depth

    def _phase_lr(self, depth: int) -> float:
        lr = self.phases[depth].lr
        return self.config.base_max_lr if lr is None else lr

    def _no_decay_rule(self) -> Callable[[str], bool] | None:
        if self.config.no_decay is None:
            return lambda name: name not in self._decay_names
        if not self.config.no_decay:
            return None
        needles = self.config.no_decay
        return lambda name: any(needle in name for needle in needles)

    def _groups_for(
        self, depth: int, lr: float | None, weight_decay: float | None
    ) -> list[dict[str, Any]]:
        return phase_groups(
            self._named_actual(self.phases[depth].params),
            depth,
            self._phase_lr(depth) if lr is None else lr,
            self._no_decay_rule(),
            weight_decay,
        )

    def _tag_groups(self, optimizer: Any) -> None:
        """Phase 0 and decayed / no-decay flags for the groups the Trainer (or user) built."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        rule = self._no_decay_rule()
        for group in optimizer.param_groups:
            group.setdefault(PHASE_KEY, 0)
            if DECAY_KEY in group:
                continue
            members = [names.get(id(p), "") for p in group["params"]]
            if rule is None:
                group[DECAY_KEY] = True
            elif members:
                group[DECAY_KEY] = not all(rule(n) for n in members)
            else:
                group[DECAY_KEY] = group.get("weight_decay", 0.0) != 0.0

    # ------------------------------------------------------------------ transitions
    def _thaw(self, depth: int) -> list[torch.nn.Parameter]:
        params = [p for _, p in self._named_actual(self.phases[depth].params)]
        for p in params:
            p.requires_grad_(True)
        self._set_batchnorm_tracking(depth)
        self.adapter.on_params_thawed(self.model, params)
        return params

    def _optimizer_reinit(self, depth: int) -> ClassInit | None:
        implicit = self.config.reinit_optim_cfg
        return implicit.optimizer_init if implicit is not None else self.phases[depth].new_optimizer

    def _scheduler_reinit(self, depth: int) -> Any:
        return self.config.reinit_lr_cfg or self.phases[depth].new_lr_scheduler

    def _grow_optimizer(self, depth: int, optimizer: Any, scheduler: Any) -> None:
        init = self._optimizer_reinit(depth)
        apply = self.config.apply_lambdas_new_pgs
        if init is None:
            groups = self._groups_for(depth, None, decay_weight_decay(optimizer))
            if not add_phase_groups(optimizer, scheduler, groups, apply):
                logger.warning(
                    "fine-tuning schedule: phase %d adds no param group (no new tensors)", depth
                )
        else:
            self._rebuild_optimizer(depth, optimizer, scheduler, init)
        reinit = self._scheduler_reinit(depth)
        if reinit is not None:
            start_lrs(optimizer, reinit.use_current_optimizer_pg_lrs, reinit.init_pg_lrs)
            reinit_scheduler(
                scheduler,
                optimizer,
                reinit.lr_scheduler_init.resolve(),
                scheduler_init_args(reinit),
                reinit.pl_lrs_cfg.interval,
                reinit.pl_lrs_cfg.frequency,
            )
        elif getattr(scheduler, "lr_lambdas", None) and not apply:
            self._warn_once(
                "lambdas",
                "fine-tuning schedule: the LR scheduler has lr_lambdas but new param groups start "
                "at their configured lr because apply_lambdas_new_pgs is false (FTS's default); "
                "set it to true to scale new groups by the current lambda",
            )

    def _rebuild_optimizer(
        self, depth: int, optimizer: Any, scheduler: Any, init: ClassInit
    ) -> None:
        """FTS's optimizer reinitialization: the new optimizer holds the existing groups (each
        keeps its current lr) plus the new phase's groups at their phase lr."""
        apply = self.config.apply_lambdas_new_pgs
        previous = [g["lr"] for g in optimizer.param_groups]
        groups = []
        for group in optimizer.param_groups:
            phase = group.get(PHASE_KEY, 0)
            rebuilt = {"params": list(group["params"]), PHASE_KEY: phase}
            rebuilt[DECAY_KEY] = group.get(DECAY_KEY, True)
            if not rebuilt[DECAY_KEY]:
                rebuilt["weight_decay"] = 0.0
            if phase > 0:
                start = new_group_lr(scheduler, self._phase_lr(phase), apply)
                rebuilt.update(lr=start, initial_lr=start)
            groups.append(rebuilt)
        added = without_owned(optimizer, self._groups_for(depth, None, None))
        for group in added:
            start = new_group_lr(scheduler, group["lr"], apply)
            group.update(lr=start, initial_lr=start)
        base_lrs = [self._phase_lr(depth)] * len(added)
        reinit_optimizer(optimizer, init.resolve(), dict(init.init_args), groups + added)
        for group, lr in zip(optimizer.param_groups, previous):
            group["lr"] = lr
        if scheduler is not None:
            # the scheduler keeps its state for the existing groups and extends to the new ones
            n_old = len(previous)
            for group, base in zip(optimizer.param_groups[n_old:], base_lrs):
                extend_scheduler(scheduler, base, group["lr"])

    def transition(self, optimizer: Any, scheduler: Any, state: TrainerState, reason: str) -> None:
        """Move to the next phase: maybe restore the best checkpoint, thaw, add param groups."""
        self.pending = None
        if self.depth >= self.final_depth:
            return
        if self.config.restore_best:
            self._restore_best(optimizer)
        new_depth = self.depth + 1
        self._thaw(new_depth)
        self._grow_optimizer(new_depth, optimizer, scheduler)
        self.depth = new_depth
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

    def _request(self, reason: str) -> None:
        if self.pending is None and self.depth < self.final_depth:
            self.pending = reason

    def _apply_pending(self, state: TrainerState, kw: dict[str, Any]) -> None:
        if self.pending is not None:
            self.transition(kw["optimizer"], kw.get("lr_scheduler"), state, self.pending)

    def _restore_best(self, optimizer: Any) -> None:
        ckpt = self.best_checkpoint
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
        logger.info("restore_best: restored %s of %s (depth %s)", restored, ckpt, self.best_depth)

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
            "es_best": self.es_best,
            "wait": self.wait,
            "epochs_checked": self.epochs_checked,
            "pending": self.pending,
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
            "es_best",
            "wait",
            "epochs_checked",
            "pending",
        ):
            setattr(self, key, sd.get(key, getattr(self, key)))
        self.transitions = list(sd.get("transitions", []))

    def _publish(self, optimizer: Any) -> None:
        # optimizer.pt then carries the state too, so resuming from a copied checkpoint works
        if optimizer is not None and optimizer.param_groups:
            optimizer.param_groups[0][STATE_GROUP_KEY] = json.dumps(self.state_dict())

    def restore_depth(self, depth: int, optimizer: Any, scheduler: Any = None) -> None:
        """Thaw phases 1..depth and add their groups (before optimizer.pt is loaded; with a
        scheduler, also extend it, for a resume that has no scheduler.pt to load)."""
        if depth > self.final_depth:
            raise FTSTransitionError(
                f"the checkpoint is at phase {depth} but this run stops at phase "
                f"{self.final_depth} (max_depth): resume with the same schedule and max_depth"
            )
        for d in range(self.depth + 1, depth + 1):
            reinit = self._scheduler_reinit(d)
            if reinit is not None:
                raise FTSTransitionError(
                    f"cannot resume past phase {d}: it reinitializes the LR scheduler "
                    f"({reinit.lr_scheduler_init.class_path}) and the Trainer loads scheduler.pt "
                    "into its own scheduler class first; resume from a checkpoint before that phase"
                )
            self._thaw(d)
            init = self._optimizer_reinit(d)
            if init is not None:
                self._rebuild_optimizer(d, optimizer, scheduler, init)
            elif scheduler is not None:
                add_phase_groups(
                    optimizer,
                    scheduler,
                    self._groups_for(d, None, decay_weight_decay(optimizer)),
                    self.config.apply_lambdas_new_pgs,
                )
            else:
                for g in without_owned(optimizer, self._groups_for(d, None, None)):
                    optimizer.add_param_group(g)
            self.depth = d

    def _load_pre_hook(self, optimizer: Any, state_dict: dict[str, Any]) -> None:
        self._optimizer_loaded = True
        saved = state_dict.get("param_groups", [])
        phases = [g.get(PHASE_KEY, 0) for g in saved]
        depth = max(phases) if phases else 0
        if saved and STATE_GROUP_KEY in saved[0]:
            self._restored_from_optimizer = json.loads(saved[0][STATE_GROUP_KEY])
        if depth > self.depth:
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

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw
    ):
        optimizer, scheduler = kw.get("optimizer"), kw.get("lr_scheduler")
        if optimizer is None:
            raise FTSTransitionError("the fine-tuning schedule needs the Trainer's optimizer")
        check_scheduler(scheduler, self.config.allow_untested)
        if isinstance(scheduler, ReduceLROnPlateau) and not args.metric_for_best_model:
            raise FTSTransitionError(
                "the LR scheduler is ReduceLROnPlateau, which the Trainer steps after each "
                "evaluation with TrainingArguments.metric_for_best_model, and that is not set: "
                "set it to the metric to reduce on (e.g. eval_loss)"
            )
        if state.global_step == 0:
            self._enforce_phase0(optimizer, scheduler)
            self._tag_groups(optimizer)
            try:
                check_group_counts(
                    self.phases,
                    self._group_counts(optimizer),
                    self.config.reinit_lr_cfg,
                    self.final_depth,
                )
            except FTSScheduleError as err:
                raise FTSTransitionError(str(err)) from None
            if state.is_world_process_zero:
                self._write_files(args)
        else:
            self._tag_groups(optimizer)
            self._resume(args, state, optimizer, scheduler)
        self._publish(optimizer)

    def _group_counts(self, optimizer: Any) -> list[int]:
        """Param groups the optimizer will have once each phase has joined."""
        counts, n = [], len(optimizer.param_groups)
        for depth, _ in enumerate(self.phases):
            if depth:
                n += len(self._groups_for(depth, None, None))
            counts.append(n)
        return counts

    def _enforce_phase0(self, optimizer: Any, scheduler: Any) -> None:
        in_opt = [p for g in optimizer.param_groups for p in g["params"]]
        phase0 = [p for _, p in self._named_actual(self.phases[0].params)]
        held, wanted = {id(p) for p in in_opt}, {id(p) for p in phase0}
        thawed = {id(p) for p in self.model.parameters() if p.requires_grad}
        if held == wanted and thawed == wanted:
            return
        names = {id(p): n for n, p in self.adapter.named_parameters(self.model)}
        summary = (
            f"the optimizer holds {len(held)} tensors ({len(held - wanted)} outside phase 0, "
            f"{sum(not p.requires_grad for p in in_opt)} not requiring grad), phase 0 has "
            f"{len(wanted)} (optimizer-only e.g. {[names.get(i) for i in list(held - wanted)[:3]]}"
            f", missing e.g. {[names.get(i) for i in list(wanted - held)[:3]]})"
        )
        if not self.config.enforce_phase0_params:
            logger.warning(
                "fine-tuning schedule: the optimizer differs from phase 0 and "
                "enforce_phase0_params is false, so it is used as built: %s",
                summary,
            )
            return
        self.freeze_to_phase(0)
        defaults = raw_optimizer(optimizer).defaults
        groups = self._groups_for(0, defaults.get("lr"), None)
        rebuild_groups(optimizer, scheduler, groups)
        logger.info(
            "fine-tuning schedule: the optimizer differs from phase 0 (%s); as "
            "enforce_phase0_params is true it now optimizes exactly the phase-0 parameters "
            "(same optimizer and LR scheduler)",
            summary,
        )

    def _write_files(self, args: TrainingArguments) -> None:
        if self.files is None:
            return
        log_dir = self.config.log_dir or args.output_dir
        base = _base_class_name(self.model)
        wanted = [(default_schedule_filename(base), self.files.schedule)]
        if self.files.keys_converted:
            wanted.append((default_schedule_filename(base, "_valid"), self.files.schedule))
        for name, schedule in wanted:
            target = os.path.join(log_dir, name)
            path, renamed = write_new_file(dump_schedule(schedule), target)
            self.written[name] = path
            what = "generated default" if self.files.generated else "explicit"
            if renamed:
                logger.warning(
                    "fine-tuning schedule: %s exists and differs, so the %s schedule was written "
                    "to %s instead (nothing was overwritten)",
                    target,
                    what,
                    path,
                )
            else:
                logger.info("fine-tuning schedule: %s schedule written to %s", what, path)

    def _resume(self, args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any):
        ckpt = self.resume_dir or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(ckpt, STATE_FILE)
        saved = None
        if os.path.isfile(path):
            saved = read_state_file(path)
        elif self._restored_from_optimizer is not None:
            saved = self._restored_from_optimizer
            if self.resume_dir is not None:
                logger.warning(
                    "fine-tuning schedule: %s is missing; using the copy of the schedule state "
                    "kept in optimizer.pt",
                    path,
                )
        partial = []
        if not self._optimizer_loaded:
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
            if self._optimizer_loaded and saved["depth"] != depth:
                raise FTSTransitionError(
                    f"{path} says phase {saved['depth']} but optimizer.pt holds phases "
                    f"0..{depth}: the checkpoint is inconsistent"
                )
            depth = saved["depth"]
        if depth > self.depth:  # optimizer.pt was not loaded: rebuild groups (and scheduler) now
            self.restore_depth(depth, optimizer, scheduler)
        sync_scheduler_lists(scheduler, len(optimizer.param_groups))
        self._check_epoch_transition(state)

    def _check_epoch_transition(self, state: TrainerState) -> None:
        completed = math.floor((state.epoch or 0.0) + 1e-6)
        if completed <= self.epochs_checked:
            return
        self.epochs_checked = completed
        mte = self.phases[self.depth].max_transition_epoch
        if 0 <= mte <= completed:
            self._request(f"max_transition_epoch {mte} reached")

    def on_epoch_begin(self, args, state, control, **kw):
        self._apply_pending(state, kw)

    def on_step_begin(self, args, state, control, **kw):
        self._apply_pending(state, kw)

    def on_step_end(self, args, state, control, **kw):
        if self.config.epoch_transitions_only:
            return
        mts = self.phases[self.depth].max_transition_step
        if 0 <= mts <= state.global_step:
            self._request(f"max_transition_step {mts} reached")

    def on_epoch_end(self, args, state, control, **kw):
        epoch_end(kw.get("lr_scheduler"))
        self._check_epoch_transition(state)
        self._publish(kw.get("optimizer"))

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.adapter.on_before_optimizer_step(self.model)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        value = _metric(metrics or {}, self.config.monitor)
        if value is None:
            available = ", ".join(sorted(metrics or {})) or "none"
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
        if self._better(value, self.best_metric, 0.0):
            self.best_metric = value
            self.best_depth = self.depth
            self._pending_best = True
        if not self.config.epoch_transitions_only:
            self._early_stopping(value, state, control)
        self._publish(kw.get("optimizer"))

    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if than is None:
            return not math.isnan(value)
        if self.config.mode == "min":
            return value + margin < than
        return value - margin > than

    def _early_stopping(self, value: float, state: TrainerState, control: TrainerControl) -> None:
        """FTSEarlyStopping._evaluate_stopping_criteria, with one best score for the whole run."""
        cfg = self.config
        monitor = cfg.monitor
        best = "none yet" if self.es_best is None else f"{self.es_best:.3f}"
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
        elif self._better(value, self.es_best, cfg.min_delta):
            self.es_best = value
            self.wait = 0
        else:
            self.wait += 1
            if self.wait >= cfg.patience:
                if self.depth >= self.final_depth:
                    reason = (
                        f"{monitor} did not improve in the last {self.wait} evaluations in the "
                        f"final phase {self.depth} (best {best})"
                    )
                else:
                    self.wait = 0
                    self._request("early stopping")
        if reason is not None:
            self.stopped = reason
            logger.info("fine-tuning schedule: %s; stopping training", reason)
            control.should_training_stop = True

    def on_save(self, args, state, control, **kw):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._pending_best:
            self.best_checkpoint = ckpt
            self._pending_best = False
        self._publish(kw.get("optimizer"))
        if state.is_world_process_zero and os.path.isdir(ckpt):
            with open(os.path.join(ckpt, STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(self.state_dict(), fh, indent=2)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _metric(metrics: dict[str, Any], monitor: str) -> float | None:
    for key in (monitor, f"eval_{monitor}"):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


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
        for key, kind in _STATE_TYPES.items()
        if not isinstance(state, dict) or not isinstance(state.get(key), kind)
    ]
    if problems:
        raise FTSTransitionError(
            f"{path} is damaged: {', '.join(problems)} missing or not an integer; restore it "
            "from a good copy of the checkpoint, or delete it to resume from the copy of the "
            "schedule state kept in optimizer.pt"
        )
    return state


def _base_class_name(model: torch.nn.Module) -> str:
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    return type(base).__name__


def default_schedule_file(model: torch.nn.Module) -> str:
    """`<ModelClass>_ft_schedule.yaml` for the (unwrapped, base) model class."""
    return default_schedule_filename(_base_class_name(model))


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

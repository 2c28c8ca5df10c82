"""Before step 0: the optimizer holds exactly phase 0, every LR-scheduler reinitialization fits
the param groups it will meet, and the schedule is written to log_dir."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import TrainerState, TrainingArguments

from .checkpoint_state import CheckpointState
from .param_groups import FTSTransitionError, check_scheduler, raw_optimizer, rebuild_groups
from .reinit_checks import check_group_counts
from .schedule import FTSScheduleError, default_schedule_filename, dump_schedule, write_new_file

logger = logging.getLogger(__name__)


class TrainStart(CheckpointState):
    """What on_train_begin checks and sets up, for a fresh run or a resumed one."""

    def _start(
        self, args: TrainingArguments, state: TrainerState, optimizer: Any, scheduler: Any
    ) -> None:
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
        base = base_class_name(self.model)
        wanted = [(default_schedule_filename(base), self.files.schedule)]
        if self.files.keys_converted:
            wanted.append((default_schedule_filename(base, "_valid"), self.files.schedule))
        for name, schedule in wanted:
            target = os.path.join(log_dir, name)
            path, renamed = write_new_file(dump_schedule(schedule), target)
            self.state.written[name] = path
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


def base_class_name(model: torch.nn.Module) -> str:
    """Class name of the (unwrapped, base) model: schedule files are named after it."""
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    return type(base).__name__

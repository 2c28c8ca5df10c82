"""A phase joins the optimizer: new param groups, or a rebuilt optimizer and LR scheduler.

FTS's rules: without reinitialization the phase's groups join at the phase lr and the LR
scheduler grows with them; `new_optimizer` (or `reinit_optim_cfg`) rebuilds the optimizer with
every existing group at its current lr; `new_lr_scheduler` (or `reinit_lr_cfg`) rebuilds the
scheduler, restarting the existing groups as `param_groups.start_lrs` says.
"""

from __future__ import annotations

import logging
from typing import Any

from .param_groups import (
    DECAY_KEY,
    PHASE_KEY,
    add_phase_groups,
    decay_weight_decay,
    extend_scheduler,
    new_group_lr,
    reinit_optimizer,
    reinit_scheduler,
    start_lrs,
    without_owned,
)
from .phase_thawing import PhaseThawing
from .reinit_checks import scheduler_init_args
from .schedule import ClassInit, LrSchedulerReinit

logger = logging.getLogger(__name__)


class Reinitialization(PhaseThawing):
    """Adds a phase to the optimizer, rebuilding optimizer and LR scheduler where asked."""

    def _optimizer_reinit(self, depth: int) -> ClassInit | None:
        implicit = self.config.reinit_optim_cfg
        return implicit.optimizer_init if implicit is not None else self.phases[depth].new_optimizer

    def _scheduler_reinit(self, depth: int) -> LrSchedulerReinit | None:
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

    def _add_phase_on_resume(self, depth: int, optimizer: Any, scheduler: Any) -> None:
        """Add phase `depth` to the optimizer as its transition did, for a resumed run (whose
        LR scheduler state, if any, comes from scheduler.pt)."""
        init = self._optimizer_reinit(depth)
        if init is not None:
            self._rebuild_optimizer(depth, optimizer, scheduler, init)
        elif scheduler is not None:
            add_phase_groups(
                optimizer,
                scheduler,
                self._groups_for(depth, None, decay_weight_decay(optimizer)),
                self.config.apply_lambdas_new_pgs,
            )
        else:
            for g in without_owned(optimizer, self._groups_for(depth, None, None)):
                optimizer.add_param_group(g)

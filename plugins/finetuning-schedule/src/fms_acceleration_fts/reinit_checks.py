"""Up-front checks of optimizer and LR-scheduler reinitialization configs, before step 0.

FTS trial-instantiates every `new_optimizer` / `new_lr_scheduler` (and the implicit
`reinit_optim_cfg` / `reinit_lr_cfg`) when training starts, so a typo fails before any step
rather than at the first phase change. `check_reinit_config` does that without a model (the
plugin runs it when the framework is built, so `fms-acceleration check` catches it);
`check_group_counts` repeats the scheduler trial with the exact number of param groups each
phase will have, once the optimizer exists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .param_groups import SUPPORTED_NAMES, SUPPORTED_SCHEDULERS
from .schedule import ClassInit, FTSScheduleError, LrSchedulerReinit, OptimizerReinit, Phase

logger = logging.getLogger(__name__)


def _dummy_optimizer(n_groups: int = 1) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(max(n_groups, 1))]
    return torch.optim.SGD(groups, lr=1.0)


def _try_build(cls: type, target: Any, kwargs: dict[str, Any], where: str, shown: str) -> None:
    """cls(target, **kwargs); any failure of the user's class is a config error naming it."""
    try:
        cls(target, **kwargs)
    except Exception as err:
        raise FTSScheduleError(f"{where}: {shown} fails: {type(err).__name__}: {err}") from None


def _import(init: ClassInit, where: str) -> type:
    try:
        return init.resolve()
    except FTSScheduleError as err:
        raise FTSScheduleError(f"{where}.class_path: {err}") from None


def scheduler_init_args(reinit: LrSchedulerReinit) -> dict[str, Any]:
    """init_args without an `optimizer` key (the current optimizer is always the one used)."""
    return {k: v for k, v in reinit.lr_scheduler_init.init_args.items() if k != "optimizer"}


def check_optimizer_reinit(reinit: OptimizerReinit, where: str) -> type:
    """Import the optimizer class and build it on a dummy parameter; return the class."""
    init = reinit.optimizer_init
    cls = _import(init, f"{where}.optimizer_init")
    name = f"{cls.__module__}.{cls.__name__}"
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise FTSScheduleError(
            f"{where}.optimizer_init.class_path: {init.class_path!r} is not a torch.optim.Optimizer"
        )
    if "ZeroRedundancyOptimizer" in name:
        raise FTSScheduleError(
            f"{where}.optimizer_init.class_path: {cls.__name__} is not supported in the context "
            "of optimizer reinitialization (it shards its parameter groups); use a torch.optim "
            "optimizer"
        )
    _try_build(
        cls,
        [torch.nn.Parameter(torch.zeros(1))],
        init.init_args,
        f"{where}.optimizer_init.init_args",
        f"{cls.__name__}(params, **{init.init_args})",
    )
    return cls


def check_scheduler_class(cls: type, where: str, allow_untested: bool) -> None:
    """Refuse a scheduler class new param groups cannot join, unless allow_untested."""
    if isinstance(cls, type) and issubclass(cls, SUPPORTED_SCHEDULERS):
        return
    if allow_untested:
        logger.warning(
            "%s: allowing untested LR scheduler %s because allow_untested is true",
            where,
            getattr(cls, "__name__", cls),
        )
        return
    raise FTSScheduleError(
        f"{where}.lr_scheduler_init.class_path: {getattr(cls, '__name__', cls)} is not a "
        f"supported LR scheduler (new param groups cannot join it); use one of {SUPPORTED_NAMES} "
        "(or a subclass), or set allow_untested: true to try it anyway"
    )


def check_lr_scheduler_reinit(
    reinit: LrSchedulerReinit, where: str, *, implicit: bool, allow_untested: bool
) -> type:
    """Import the scheduler class, check its options, build it on a dummy optimizer."""
    init = reinit.lr_scheduler_init
    cls = _import(init, f"{where}.lr_scheduler_init")
    check_scheduler_class(cls, where, allow_untested)
    if "optimizer" in init.init_args:
        logger.warning(
            "%s.lr_scheduler_init.init_args has an `optimizer` key; it is dropped: the current "
            "optimizer and all its param groups are used when the scheduler is rebuilt",
            where,
        )
    args = scheduler_init_args(reinit)
    plateau = isinstance(cls, type) and issubclass(cls, ReduceLROnPlateau)
    lrs = reinit.pl_lrs_cfg
    if lrs.reduce_on_plateau is not None and lrs.reduce_on_plateau != plateau:
        raise FTSScheduleError(
            f"{where}.pl_lrs_cfg.reduce_on_plateau: {str(lrs.reduce_on_plateau).lower()} does not "
            f"match the scheduler class {cls.__name__}; remove it (it is derived from the class)"
        )
    if plateau:
        if not lrs.monitor:
            raise FTSScheduleError(
                f"{where}.pl_lrs_cfg.monitor: the lr scheduler config must include a monitor when "
                "a ReduceLROnPlateau scheduler is used; set it to the metric to reduce on, the "
                "same as TrainingArguments.metric_for_best_model (the Trainer steps "
                "ReduceLROnPlateau with that metric)"
            )
        if lrs.frequency != 1:
            raise FTSScheduleError(
                f"{where}.pl_lrs_cfg.frequency: {lrs.frequency}: the Trainer steps "
                "ReduceLROnPlateau after every evaluation; remove frequency"
            )
    if implicit:
        if reinit.init_pg_lrs is not None:
            raise FTSScheduleError(
                f"{where}.init_pg_lrs: not allowed in reinit_lr_cfg (implicit mode): the same lr "
                "scheduler config is rebuilt at every phase, so one list of per-group lrs cannot "
                "fit them all"
            )
        if plateau and isinstance(args.get("min_lr"), (list, tuple)):
            raise FTSScheduleError(
                f"{where}.lr_scheduler_init.init_args.min_lr: cannot be a list or tuple in "
                "reinit_lr_cfg (implicit mode): the same lr scheduler config is rebuilt at every "
                "phase, with a different number of param groups each time"
            )
    trial = dict(args)
    if plateau and isinstance(trial.get("min_lr"), (list, tuple)):
        trial.pop("min_lr")  # checked against the real number of groups by check_group_counts
    _try_build(
        cls,
        _dummy_optimizer(),
        trial,
        f"{where}.lr_scheduler_init.init_args",
        f"{cls.__name__}(optimizer, **{args})",
    )
    return cls


def check_reinit_config(
    phases: Sequence[Any],
    reinit_optim: OptimizerReinit | None,
    reinit_lr: LrSchedulerReinit | None,
    allow_untested: bool,
) -> None:
    """Check every reinitialization directive of a parsed schedule and the implicit configs."""
    if reinit_optim is not None:
        check_optimizer_reinit(reinit_optim, "reinit_optim_cfg")
    if reinit_lr is not None:
        check_lr_scheduler_reinit(
            reinit_lr, "reinit_lr_cfg", implicit=True, allow_untested=allow_untested
        )
    for depth, spec in enumerate(phases):
        if spec.new_optimizer is not None:
            check_optimizer_reinit(spec.new_optimizer, f"phase {depth}.new_optimizer")
        if spec.new_lr_scheduler is not None:
            check_lr_scheduler_reinit(
                spec.new_lr_scheduler,
                f"phase {depth}.new_lr_scheduler",
                implicit=False,
                allow_untested=allow_untested,
            )


def check_group_counts(
    phases: Sequence[Phase],
    counts: Sequence[int],
    reinit_lr: LrSchedulerReinit | None,
    final: int,
) -> None:
    """Rebuild each phase's new LR scheduler on as many param groups as it will meet.

    `counts[d]` is the number of param groups once phase d has joined. Catches an `init_pg_lrs`
    longer than the groups it sets and a ReduceLROnPlateau `min_lr` list of the wrong length.
    """
    for depth in range(1, final + 1):
        reinit = reinit_lr or phases[depth].new_lr_scheduler
        if reinit is None:
            continue
        where = "reinit_lr_cfg" if reinit_lr is not None else f"phase {depth}.new_lr_scheduler"
        n = counts[depth]
        if reinit.init_pg_lrs is not None and len(reinit.init_pg_lrs) > n:
            raise FTSScheduleError(
                f"{where}.init_pg_lrs has {len(reinit.init_pg_lrs)} lrs but the optimizer has "
                f"{n} param groups at phase {depth} (groups by phase: {_by_phase(counts, depth)})"
            )
        cls = reinit.lr_scheduler_init.resolve()
        args = scheduler_init_args(reinit)
        _try_build(
            cls,
            _dummy_optimizer(n),
            args,
            f"{where}.lr_scheduler_init.init_args",
            f"at phase {depth}, {cls.__name__}(optimizer with {n} param groups, **{args})",
        )


def _by_phase(counts: Sequence[int], depth: int) -> str:
    previous = [0, *counts[:depth]]
    return ", ".join(f"{d}: {counts[d] - previous[d]}" for d in range(depth + 1))

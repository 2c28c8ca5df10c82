"""Optimizer param groups and LR schedulers that grow phase by phase.

Pure torch: adds a phase's parameters as new param groups (decay / no-decay, as the Trainer
splits them), extends an LR scheduler's per-group lists to the new groups, and rebuilds an
optimizer or scheduler in place when a phase asks for reinitialization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiplicativeLR, ReduceLROnPlateau

PHASE_KEY = "fts_phase"  # recorded in every param group; survives optimizer.state_dict()
DECAY_KEY = "fts_decay"

# Schedulers whose per-group state is base_lrs (+ lr_lambdas) only, so new groups can join.
CLOSED_FORM_SCHEDULERS = (
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "PolynomialLR",
    "CosineAnnealingWarmRestarts",
)


class FTSTransitionError(RuntimeError):
    """A phase transition cannot be applied to this optimizer or LR scheduler."""


def raw_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside an accelerate AcceleratedOptimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, Optimizer) else optimizer


def tag_phase(optimizer: Any, phase: int) -> None:
    """Record `phase` in every param group that has no phase yet (the Trainer's own groups)."""
    for group in optimizer.param_groups:
        group.setdefault(PHASE_KEY, phase)
        group.setdefault(DECAY_KEY, group.get("weight_decay", 0.0) != 0.0)


def group_phases(optimizer: Any) -> list[int]:
    """Phase of each param group, in order (-1 for an untagged group)."""
    return [g.get(PHASE_KEY, -1) for g in optimizer.param_groups]


def split_decay(
    named_params: Sequence[tuple[str, torch.nn.Parameter]], decay_names: set[str]
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Split (actual name, param) pairs into (decay, no-decay) lists, keeping order."""
    decay = [p for n, p in named_params if n in decay_names]
    no_decay = [p for n, p in named_params if n not in decay_names]
    return decay, no_decay


def phase_groups(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    decay_names: set[str],
    phase: int,
    lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Param groups for one phase: decay then no-decay, empty ones left out."""
    decay, no_decay = split_decay(named_params, decay_names)
    groups = []
    for params, wd, is_decay in ((decay, weight_decay, True), (no_decay, 0.0, False)):
        if params:
            groups.append(
                {
                    "params": params,
                    "lr": lr,
                    "initial_lr": lr,
                    "weight_decay": wd,
                    PHASE_KEY: phase,
                    DECAY_KEY: is_decay,
                }
            )
    return groups


def _shared_lambda(fn: Callable[[int], float]) -> Callable[[int], float]:
    # A plain function (not a partial/callable object) so LambdaLR.state_dict stores None for it:
    # a checkpoint with more groups then still loads into a scheduler that has fewer lambdas.
    def lr_lambda(step: int) -> float:
        return fn(step)

    return lr_lambda


def check_scheduler(scheduler: Any) -> None:
    """Raise FTSTransitionError if new param groups cannot join this LR scheduler."""
    if scheduler is None or isinstance(scheduler, ReduceLROnPlateau):
        return
    name = type(scheduler).__name__
    if name not in CLOSED_FORM_SCHEDULERS and not (
        isinstance(scheduler, LRScheduler) and hasattr(scheduler, "lr_lambdas")
    ):
        raise FTSTransitionError(
            f"LR scheduler {name} cannot be extended to new param groups; use one of "
            f"{', '.join(CLOSED_FORM_SCHEDULERS)} or ReduceLROnPlateau (TrainingArguments."
            "lr_scheduler_type linear, cosine, constant, ... all build LambdaLR)"
        )


def _lambda_factor(scheduler: Any, step: int) -> float:
    fn = scheduler.lr_lambdas[0]
    return fn(step)


def sync_scheduler_lists(scheduler: Any, n_groups: int) -> None:
    """Pad lr_lambdas (and min_lrs) to n_groups after a state dict with more groups loaded."""
    if scheduler is None:
        return
    if isinstance(scheduler, (LambdaLR, MultiplicativeLR)) or hasattr(scheduler, "lr_lambdas"):
        while len(scheduler.lr_lambdas) < n_groups:
            scheduler.lr_lambdas.append(_shared_lambda(scheduler.lr_lambdas[0]))
    if isinstance(scheduler, ReduceLROnPlateau):
        while len(scheduler.min_lrs) < n_groups:
            scheduler.min_lrs.append(scheduler.min_lrs[0])
    for attr in ("base_lrs", "_last_lr"):
        values = getattr(scheduler, attr, None)
        if values is not None and len(values) != n_groups:
            raise FTSTransitionError(
                f"LR scheduler {type(scheduler).__name__}.{attr} has {len(values)} entries for "
                f"{n_groups} param groups: the checkpoint's scheduler does not match its optimizer"
            )


def extend_scheduler(scheduler: Any, new_groups: Sequence[dict[str, Any]]) -> None:
    """Extend an LR scheduler to param groups just added to its optimizer; set their current lr."""
    if scheduler is None:
        return
    check_scheduler(scheduler)
    for group in new_groups:
        base = group["initial_lr"]
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.min_lrs.append(scheduler.min_lrs[0] if scheduler.min_lrs else 0.0)
            current = base
        else:
            scheduler.base_lrs.append(base)
            if hasattr(scheduler, "lr_lambdas"):
                scheduler.lr_lambdas.append(_shared_lambda(scheduler.lr_lambdas[0]))
            if isinstance(scheduler, LambdaLR):
                # LambdaLR's lr is base_lr * lambda(step): join the schedule where it is now.
                current = base * _lambda_factor(scheduler, scheduler.last_epoch)
            else:
                current = base
        group["lr"] = current
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(current)


def add_phase_groups(optimizer: Any, scheduler: Any, groups: Sequence[dict[str, Any]]) -> None:
    """Add groups to the optimizer and extend the scheduler to them."""
    check_scheduler(scheduler)
    for group in groups:
        optimizer.add_param_group(group)
    # add_param_group copies the dict; work on the optimizer's own entries.
    extend_scheduler(scheduler, optimizer.param_groups[len(optimizer.param_groups) - len(groups) :])


def _transplant(target: Any, fresh: Any, keep: Callable[[str], bool]) -> None:
    """Turn `target` into `fresh` in place, so every holder of `target` sees the new object."""
    kept = {k: v for k, v in target.__dict__.items() if keep(k)}
    target.__class__ = fresh.__class__
    target.__dict__.clear()
    target.__dict__.update(fresh.__dict__)
    target.__dict__.update(kept)


def reinit_optimizer(
    optimizer: Any, cls: type, init_args: dict[str, Any], groups: list[dict[str, Any]]
) -> Optimizer:
    """Rebuild the (raw) optimizer in place as cls(groups, **init_args); state starts empty."""
    raw = raw_optimizer(optimizer)
    try:
        fresh = cls(groups, **init_args)
    except (TypeError, ValueError) as err:
        raise FTSTransitionError(
            f"cannot build optimizer {cls.__name__}({init_args}): {err}"
        ) from err
    if not isinstance(fresh, Optimizer):
        raise FTSTransitionError(f"{cls.__name__} is not a torch.optim.Optimizer")
    for group in fresh.param_groups:
        group["initial_lr"] = group["lr"]
    # keep the hooks registered on the old object (e.g. the resume hook of the FTS callback)
    _transplant(raw, fresh, keep=lambda k: k.startswith("_optimizer_") and k.endswith("hooks"))
    return raw


def reinit_scheduler(scheduler: Any, optimizer: Any, cls: type, init_args: dict[str, Any]) -> None:
    """Rebuild the LR scheduler in place as cls(optimizer, **init_args) from the groups' lrs."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    try:
        fresh = cls(optimizer, **init_args)
    except (TypeError, ValueError) as err:
        raise FTSTransitionError(
            f"cannot build LR scheduler {cls.__name__}({init_args}): {err}"
        ) from err
    check_scheduler(fresh)
    _transplant(scheduler, fresh, keep=lambda k: False)


def rebase_scheduler(scheduler: Any, optimizer: Any) -> None:
    """Point an existing scheduler's per-group lists at a rebuilt optimizer's groups."""
    if scheduler is None:
        return
    groups = optimizer.param_groups
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.min_lrs = [scheduler.min_lrs[0] if scheduler.min_lrs else 0.0] * len(groups)
        scheduler._last_lr = [g["lr"] for g in groups]
        return
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    if hasattr(scheduler, "lr_lambdas"):
        first = scheduler.lr_lambdas[0]
        scheduler.lr_lambdas = [first] + [_shared_lambda(first) for _ in groups[1:]]
    if isinstance(scheduler, LambdaLR):
        factor = _lambda_factor(scheduler, scheduler.last_epoch)
        for g in groups:
            g["lr"] = g["initial_lr"] * factor
    scheduler._last_lr = [g["lr"] for g in groups]

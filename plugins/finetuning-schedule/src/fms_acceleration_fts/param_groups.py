"""Optimizer param groups and LR schedulers that grow phase by phase.

Torch only (plus the core's error type): adds a phase's parameters as new param groups,
extends an LR scheduler's per-group lists to them, rebuilds an optimizer or scheduler in place
when a phase asks for reinitialization, and paces a rebuilt scheduler by epoch or every N
steps. The lr rules are
Fine-Tuning Scheduler's: a new group starts at its phase lr; a rebuilt optimizer keeps every
existing group's current lr; a rebuilt scheduler restarts existing groups from their
``initial_lr`` (or their current lr; or ``init_pg_lrs`` for the first groups, the others keeping
their current lr).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiplicativeLR,
    MultiStepLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)

from fms_acceleration.errors import AccelerationFrameworkError

logger = logging.getLogger(__name__)

PHASE_KEY = "fts_phase"  # recorded in every param group; survives optimizer.state_dict()
DECAY_KEY = "fts_decay"
STATE_GROUP_KEY = "fts_state"  # copy of the callback state kept in param group 0 of optimizer.pt

# FTS's supported schedulers (and their subclasses), plus PolynomialLR: per-group state is
# base_lrs (+ lr_lambdas / min_lrs) only, so new groups can join them.
SUPPORTED_SCHEDULERS: tuple[type, ...] = (
    LambdaLR,
    MultiplicativeLR,
    StepLR,
    MultiStepLR,
    ExponentialLR,
    CosineAnnealingLR,
    ReduceLROnPlateau,
    CosineAnnealingWarmRestarts,
    ConstantLR,
    LinearLR,
    PolynomialLR,
)
SUPPORTED_NAMES = ", ".join(c.__name__ for c in SUPPORTED_SCHEDULERS)


class FTSTransitionError(AccelerationFrameworkError):
    """A phase transition (or a resume) cannot be applied to this optimizer or LR scheduler.

    An AccelerationFrameworkError (a RuntimeError), so clients such as `fms-acceleration train`
    report it in one line."""


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


def decay_weight_decay(optimizer: Any) -> float:
    """Weight decay for the decayed groups of new phases: what the optimizer gives phase 0.

    That is the largest weight decay among the existing groups (the Trainer's decay group holds
    TrainingArguments.weight_decay, a user optimizer's groups its default), else the
    optimizer's default.
    """
    decays = [g.get("weight_decay", 0.0) for g in optimizer.param_groups]
    nonzero = [d for d in decays if d]
    if nonzero:
        return max(nonzero)
    return float(getattr(raw_optimizer(optimizer), "defaults", {}).get("weight_decay", 0.0))


def phase_groups(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    phase: int,
    lr: float,
    is_no_decay: Callable[[str], bool] | None,
    weight_decay: float | None,
) -> list[dict[str, Any]]:
    """Param groups for one phase, empty ones left out.

    `is_no_decay` None: one group (FTS without ``no_decay``); otherwise a decayed group (with
    `weight_decay`, or the optimizer's default when None) then a no-decay group (0.0).
    """
    if is_no_decay is None:
        splits = [(list(named_params), True)]
    else:
        splits = [
            ([(n, p) for n, p in named_params if not is_no_decay(n)], True),
            ([(n, p) for n, p in named_params if is_no_decay(n)], False),
        ]
    groups = []
    for members, decayed in splits:
        if not members:
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in members],
            "lr": lr,
            "initial_lr": lr,
            PHASE_KEY: phase,
            DECAY_KEY: decayed,
        }
        if not decayed:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def without_owned(optimizer: Any, groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups minus the parameters an existing group already owns (FTS: they are not re-added)."""
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    out = []
    for group in groups:
        params = [p for p in group["params"] if id(p) not in owned]
        if params:
            out.append({**group, "params": params})
    return out


def _shared_lambda(fn: Callable[[int], float]) -> Callable[[int], float]:
    # A plain function (not a partial/callable object) so LambdaLR.state_dict stores None for it:
    # a checkpoint with more groups then still loads into a scheduler that has fewer lambdas.
    def lr_lambda(step: int) -> float:
        return fn(step)

    return lr_lambda


def is_supported_scheduler(scheduler: Any) -> bool:
    """Whether new param groups can join this LR scheduler (a supported class or subclass)."""
    return isinstance(scheduler, SUPPORTED_SCHEDULERS)


def check_scheduler(scheduler: Any, allow_untested: bool = False) -> None:
    """Refuse an LR scheduler new groups cannot join (with allow_untested: only warn)."""
    if scheduler is None or is_supported_scheduler(scheduler):
        return
    name = type(scheduler).__name__
    if allow_untested:
        logger.warning(
            "fine-tuning schedule: allowing untested LR scheduler %s because allow_untested is "
            "true; new param groups join it through base_lrs only",
            name,
        )
        return
    raise FTSTransitionError(
        f"LR scheduler {name} is not supported: new param groups cannot join it. Use one of "
        f"{SUPPORTED_NAMES} (or a subclass; TrainingArguments.lr_scheduler_type linear, cosine, "
        "constant, ... all build LambdaLR), or set allow_untested: true to try it anyway"
    )


def sync_scheduler_lists(scheduler: Any, n_groups: int) -> None:
    """Pad lr_lambdas (and min_lrs) to n_groups after a state dict with more groups loaded."""
    if scheduler is None:
        return
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:
        while len(lambdas) < n_groups:
            lambdas.append(_shared_lambda(lambdas[-1]))
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


def new_group_lr(scheduler: Any, lr: float, apply_lambdas: bool) -> float:
    """Starting lr of a new group: the phase lr, times the current lambda with apply_lambdas."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if apply_lambdas and lambdas:
        return lr * lambdas[-1](scheduler.last_epoch)
    return lr


def add_phase_groups(
    optimizer: Any, scheduler: Any, groups: Sequence[dict[str, Any]], apply_lambdas: bool = False
) -> int:
    """Add a phase's groups (minus already-owned params) and extend the scheduler to them.

    A new group starts at its phase lr (times the scheduler's current lambda with
    `apply_lambdas`); the scheduler's base_lrs take the phase lr. Returns the groups added.
    """
    groups = without_owned(optimizer, groups)
    if not groups:
        return 0
    for group in groups:
        start = new_group_lr(scheduler, group["lr"], apply_lambdas)
        optimizer.add_param_group({**group, "lr": start, "initial_lr": start})
        extend_scheduler(scheduler, base_lr=group["lr"], current=start)
    return len(groups)


def extend_scheduler(scheduler: Any, base_lr: float, current: float) -> None:
    """Extend the scheduler's per-group lists to one new group (base lr, current lr)."""
    if scheduler is None:
        return
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.min_lrs.append(scheduler.min_lrs[0] if scheduler.min_lrs else 0.0)
    else:
        scheduler.base_lrs.append(base_lr)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas:
            lambdas.append(_shared_lambda(lambdas[-1]))
    if getattr(scheduler, "_last_lr", None) is not None:
        scheduler._last_lr.append(current)


def _transplant(target: Any, fresh: Any, keep: Callable[[str], bool], cls: type | None = None):
    """Turn `target` into `fresh` in place, so every holder of `target` sees the new object."""
    kept = {k: v for k, v in target.__dict__.items() if keep(k)}
    target.__class__ = cls or fresh.__class__
    target.__dict__.clear()
    target.__dict__.update(fresh.__dict__)
    target.__dict__.update(kept)


def build_optimizer(cls: type, init_args: dict[str, Any], groups: list[dict[str, Any]]):
    """cls(groups, **init_args), with construction errors as FTSTransitionError."""
    try:
        fresh = cls(groups, **init_args)
    except (TypeError, ValueError) as err:
        raise FTSTransitionError(
            f"cannot build optimizer {cls.__name__}({init_args}): {err}"
        ) from err
    if not isinstance(fresh, Optimizer):
        raise FTSTransitionError(f"{cls.__name__} is not a torch.optim.Optimizer")
    return fresh


def reinit_optimizer(
    optimizer: Any, cls: type, init_args: dict[str, Any], groups: list[dict[str, Any]]
) -> Optimizer:
    """Rebuild the (raw) optimizer in place as cls(groups, **init_args); state starts empty.

    Groups without an ``initial_lr`` get their constructed lr as one (FTS does the same).
    """
    raw = raw_optimizer(optimizer)
    fresh = build_optimizer(cls, init_args, groups)
    for group in fresh.param_groups:
        group.setdefault("initial_lr", group["lr"])
    # keep the hooks registered on the old object (e.g. the resume hook of the FTS callback)
    _transplant(raw, fresh, keep=lambda k: k.startswith("_optimizer_") and k.endswith("hooks"))
    return raw


def start_lrs(optimizer: Any, use_current: bool, init_pg_lrs: Sequence[float] | None) -> None:
    """Set the groups' lrs as FTS does before building a new LR scheduler.

    Without `init_pg_lrs` every group restarts from its initial_lr (or keeps its current lr
    with `use_current`). `init_pg_lrs` replaces that list: it sets lr and initial_lr of the
    first groups, and the groups it does not reach keep their current lr.
    """
    if init_pg_lrs:
        for group, lr in zip(optimizer.param_groups, init_pg_lrs):
            group["lr"] = lr
            group["initial_lr"] = lr
        return
    if not use_current:
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])


def build_scheduler(cls: type, optimizer: Optimizer, init_args: dict[str, Any]) -> Any:
    """cls(optimizer, **init_args), with construction errors as FTSTransitionError."""
    try:
        return cls(optimizer, **init_args)
    except (TypeError, ValueError) as err:
        raise FTSTransitionError(
            f"cannot build LR scheduler {cls.__name__}({init_args}): {err}"
        ) from err


def reinit_scheduler(
    scheduler: Any,
    optimizer: Any,
    cls: type,
    init_args: dict[str, Any],
    interval: str = "step",
    frequency: int = 1,
) -> None:
    """Rebuild the LR scheduler in place as cls(optimizer, **init_args) (lrs set by start_lrs).

    Stepped once per `frequency` optimizer steps, or once per `frequency` epochs (epoch_end()).
    """
    fresh = build_scheduler(cls, raw_optimizer(optimizer), init_args)
    paced = None
    if not isinstance(fresh, ReduceLROnPlateau) and (interval, frequency) != ("step", 1):
        paced = paced_class(type(fresh))
        fresh.__dict__.update(
            {"fts_interval": interval, "fts_frequency": frequency, "fts_calls": 0}
        )
    _transplant(scheduler, fresh, keep=lambda k: False, cls=paced)


# ----------------------------------------------------------------------------------- pacing
_PACED: dict[type, type] = {}


def paced_class(base: type) -> type:
    """A subclass of `base` whose step() the Trainer calls every optimizer step but which only
    advances every `fts_frequency` steps, or (interval epoch) only from epoch_end()."""
    if base in _PACED:
        return _PACED[base]

    def step(self: Any, *args: Any, **kwargs: Any) -> None:
        if self.fts_interval == "epoch":
            return None
        self.fts_calls += 1
        if self.fts_calls % self.fts_frequency == 0:
            base.step(self, *args, **kwargs)
        return None

    def epoch_end(self: Any) -> None:
        """Count one epoch; advance the schedule every `fts_frequency` epochs."""
        if self.fts_interval != "epoch":
            return
        self.fts_calls += 1
        if self.fts_calls % self.fts_frequency == 0:
            base.step(self)

    cls = type(base.__name__, (base,), {"step": step, "epoch_end": epoch_end, "fts_paced": True})
    cls.__qualname__ = f"paced {base.__qualname__}"
    _PACED[base] = cls
    return cls


def epoch_end(scheduler: Any) -> None:
    """Step an epoch-paced scheduler (no-op for every other scheduler)."""
    if getattr(type(scheduler), "fts_paced", False):
        scheduler.epoch_end()


# ------------------------------------------------------------------------------ rebuild phase 0
def rebuild_groups(optimizer: Any, scheduler: Any, groups: list[dict[str, Any]]) -> None:
    """Replace every param group (and the optimizer state) by `groups`, and restart the LR
    scheduler on them, as FTS does to enforce phase 0 on a user optimizer."""
    raw = raw_optimizer(optimizer)
    raw.param_groups.clear()
    raw.state.clear()
    for group in groups:
        raw.add_param_group(group)
    if scheduler is None:
        return
    n = len(raw.param_groups)
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.min_lrs = [scheduler.min_lrs[0] if scheduler.min_lrs else 0.0] * n
        scheduler._last_lr = [g["lr"] for g in raw.param_groups]
        return
    for group in raw.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler.base_lrs = [g["initial_lr"] for g in raw.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas:
        scheduler.lr_lambdas = [lambdas[0]] + [_shared_lambda(lambdas[0]) for _ in range(n - 1)]
    if isinstance(scheduler, LRScheduler):
        scheduler.last_epoch = -1
        scheduler._initial_step()


# ------------------------------------------------------------------------ restore optimizer state
def load_group_states(optimizer: Any, saved: dict[str, Any]) -> str | None:
    """Load a checkpoint's per-parameter optimizer state into the groups it has in common with
    `optimizer` (the first ones); the rest start fresh. Group hyperparameters (lrs) are kept.

    Returns None, or why the state does not fit (another optimizer class, other group sizes).
    """
    raw = raw_optimizer(optimizer)
    groups = saved.get("param_groups", [])
    state = saved.get("state", {})
    if len(groups) > len(raw.param_groups):
        return f"it has {len(groups)} param groups, the optimizer {len(raw.param_groups)}"
    for mine, theirs in zip(raw.param_groups, groups):
        if len(mine["params"]) != len(theirs["params"]):
            return "its param group sizes differ from the optimizer's"
    ignore = {"params", "lr", "initial_lr", PHASE_KEY, DECAY_KEY, STATE_GROUP_KEY}
    mine_keys = {k for k in raw.param_groups[0] if k not in ignore} if raw.param_groups else set()
    their_keys = {k for k in groups[0] if k not in ignore} if groups else set()
    if groups and mine_keys != their_keys:
        return "it was written by another optimizer class (a reinitialized optimizer)"
    raw.state.clear()
    for mine, theirs in zip(raw.param_groups, groups):
        for param, index in zip(mine["params"], theirs["params"]):
            if index in state:
                raw.state[param] = {
                    k: (v.to(param.device) if torch.is_tensor(v) and k != "step" else v)
                    for k, v in state[index].items()
                }
    return None

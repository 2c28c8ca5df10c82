"""Param groups joining an optimizer and LR schedulers mid-run (pure torch)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import (
    CyclicLR,
    LambdaLR,
    ReduceLROnPlateau,
    StepLR,
)

from fms_acceleration_fts.param_groups import (
    FTSTransitionError,
    add_phase_groups,
    phase_groups,
    reinit_optimizer,
    reinit_scheduler,
    sync_scheduler_lists,
    tag_phase,
)


def params(seed: int, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            f"l{i}.{'weight' if i % 2 == 0 else 'bias'}",
            torch.nn.Parameter(torch.randn(5, 3, generator=gen)),
        )
        for i in range(n)
    ]


def test_phase_groups_split_decay_and_skip_empty():
    named = params(1, 3)
    groups = phase_groups(named, {"l0.weight", "l2.weight"}, phase=2, lr=0.5, weight_decay=0.1)
    assert [
        (g["fts_phase"], g["fts_decay"], len(g["params"]), g["weight_decay"]) for g in groups
    ] == [
        (2, True, 2, 0.1),
        (2, False, 1, 0.0),
    ]
    assert all(g["lr"] == g["initial_lr"] == 0.5 for g in groups)
    only_decay = phase_groups(named[:1], {"l0.weight"}, phase=1, lr=0.5, weight_decay=0.1)
    assert len(only_decay) == 1


def test_lambda_lr_extension_joins_schedule_where_it_is():
    p0, p1 = params(2, 2)
    opt = torch.optim.AdamW([{"params": [p0[1]]}], lr=1.0)
    sched = LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.step()
        sched.step()
    tag_phase(opt, 0)
    add_phase_groups(opt, sched, phase_groups([p1], set(), phase=1, lr=0.2, weight_decay=0.0))
    # new group starts at its base lr times the schedule's current factor
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1 / 4, 0.2 / 4])
    assert sched.base_lrs == [1.0, 0.2] and len(sched.lr_lambdas) == 2
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([1 / 5, 0.2 / 5])

    # the state dict of the grown scheduler loads into a fresh, 1-group scheduler
    state = sched.state_dict()
    assert state["lr_lambdas"][1] is None  # the shared lambda is a plain function: not saved
    # as on resume: the Trainer's scheduler is built for phase 0, then the group is added
    opt2 = torch.optim.AdamW([{"params": [p0[1]]}], lr=1.0)
    fresh = LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    opt2.add_param_group({"params": [p1[1]], "lr": 0.2, "initial_lr": 0.2})
    fresh.load_state_dict(state)
    assert len(fresh.lr_lambdas) == 1
    sync_scheduler_lists(fresh, 2)
    assert len(fresh.lr_lambdas) == 2
    fresh.step()
    assert fresh.get_last_lr() == pytest.approx([1 / 6, 0.2 / 6])


def test_step_lr_and_plateau_extend():
    (_, a), (n1, b) = params(3, 2)
    opt = torch.optim.SGD([a], lr=1.0)
    sched = StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    add_phase_groups(opt, sched, phase_groups([(n1, b)], set(), phase=1, lr=0.4, weight_decay=0.0))
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.25, 0.2])

    opt = torch.optim.SGD([a], lr=1.0)
    plateau = ReduceLROnPlateau(opt, min_lr=0.01)
    add_phase_groups(
        opt, plateau, phase_groups([(n1, b)], set(), phase=1, lr=0.4, weight_decay=0.0)
    )
    assert plateau.min_lrs == [0.01, 0.01]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.4]


def test_unsupported_scheduler_is_named():
    (_, a), (n1, b) = params(4, 2)
    opt = torch.optim.SGD([a], lr=1.0, momentum=0.9)
    sched = CyclicLR(opt, base_lr=0.1, max_lr=1.0)
    with pytest.raises(FTSTransitionError, match=r"LR scheduler CyclicLR cannot be extended"):
        add_phase_groups(
            opt, sched, phase_groups([(n1, b)], set(), phase=1, lr=0.4, weight_decay=0)
        )
    assert len(opt.param_groups) == 1  # nothing half-added


def test_reinit_in_place_keeps_identity_and_hooks():
    (n0, a), (n1, b) = params(5, 2)
    opt = torch.optim.AdamW([a], lr=1.0)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(len(sd["param_groups"])))
    sched = LambdaLR(opt, lambda s: 0.5)
    a.grad = torch.ones_like(a)
    opt.step()
    groups = phase_groups([(n0, a)], set(), 0, 0.3, 0.0) + phase_groups(
        [(n1, b)], set(), 1, 0.3, 0.0
    )
    for g in groups:
        g.pop("initial_lr")
    same = reinit_optimizer(opt, torch.optim.SGD, {"lr": 0.3}, groups)
    assert same is opt and isinstance(opt, torch.optim.SGD) and len(opt.state) == 0
    assert [g["fts_phase"] for g in opt.param_groups] == [0, 1]
    reinit_scheduler(sched, opt, StepLR, {"step_size": 1, "gamma": 0.1})
    assert isinstance(sched, StepLR) and sched.base_lrs == [0.3, 0.3]
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.03, 0.03])
    opt.load_state_dict(opt.state_dict())
    assert calls == [2]  # the pre-hook survived the transplant
    with pytest.raises(FTSTransitionError, match=r"cannot build optimizer SGD"):
        reinit_optimizer(opt, torch.optim.SGD, {"lr": 0.1, "momentun": 0.9}, groups)

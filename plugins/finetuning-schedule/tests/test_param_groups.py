"""Param groups joining an optimizer and LR schedulers mid-run (pure torch)."""

from __future__ import annotations

import copy

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
    check_scheduler,
    decay_weight_decay,
    epoch_end,
    load_group_states,
    phase_groups,
    rebuild_groups,
    reinit_optimizer,
    reinit_scheduler,
    start_lrs,
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


def is_bias(name: str) -> bool:
    return name.endswith("bias")


def test_phase_groups_split_decay_and_skip_empty():
    named = params(1, 3)
    groups = phase_groups(named, 2, 0.5, is_bias, 0.1)
    assert [
        (g["fts_phase"], g["fts_decay"], len(g["params"]), g["weight_decay"]) for g in groups
    ] == [
        (2, True, 2, 0.1),
        (2, False, 1, 0.0),
    ]
    assert all(g["lr"] == g["initial_lr"] == 0.5 for g in groups)
    assert len(phase_groups(named[:1], 1, 0.5, is_bias, 0.1)) == 1
    # no no-decay rule: one group; no weight decay given: the optimizer's default applies
    (single,) = phase_groups(named, 1, 0.5, None, None)
    assert len(single["params"]) == 3 and "weight_decay" not in single


def test_new_groups_take_the_weight_decay_phase_0_has():
    (_, a), (_, b) = params(9, 2)
    assert decay_weight_decay(torch.optim.SGD([a], lr=1.0, weight_decay=1e-6)) == 1e-6
    trainer_like = torch.optim.AdamW(
        [{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1.0
    )
    assert decay_weight_decay(trainer_like) == 0.1  # not AdamW's default 0.01
    assert decay_weight_decay(torch.optim.SGD([a], lr=1.0)) == 0.0


def test_lambda_lr_new_group_starts_at_phase_lr_unless_apply_lambdas():
    """FTS's apply_lambdas_new_pgs: False keeps the phase lr until the next scheduler step."""
    for apply, first in ((False, 0.2), (True, 0.2 / 4)):
        p0, p1 = params(2, 2)
        opt = torch.optim.AdamW([{"params": [p0[1]]}], lr=1.0)
        sched = LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for _ in range(3):
            opt.step()
            sched.step()
        tag_phase(opt, 0)
        added = add_phase_groups(opt, sched, phase_groups([p1], 1, 0.2, None, 0.0), apply)
        assert added == 1
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([1 / 4, first])
        assert opt.param_groups[1]["initial_lr"] == pytest.approx(first)
        assert sched.base_lrs == [1.0, 0.2] and len(sched.lr_lambdas) == 2
        opt.step()
        sched.step()
        # base_lrs hold the phase lr either way: the schedule takes over at the next step
        assert sched.get_last_lr() == pytest.approx([1 / 5, 0.2 / 5])

    # the state dict of the grown scheduler loads into a fresh, 1-group scheduler
    state = sched.state_dict()
    assert state["lr_lambdas"][1] is None  # the shared lambda is a plain function: not saved
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
    add_phase_groups(opt, sched, phase_groups([(n1, b)], 1, 0.4, None, 0.0))
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.25, 0.2])

    opt = torch.optim.SGD([a], lr=1.0)
    plateau = ReduceLROnPlateau(opt, min_lr=0.01)
    add_phase_groups(opt, plateau, phase_groups([(n1, b)], 1, 0.4, None, 0.0))
    assert plateau.min_lrs == [0.01, 0.01]
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.4]


def test_params_already_in_the_optimizer_are_not_added_again():
    """FTS test_add_groups_excludes_params_already_in_optimizer (and its no_decay variant)."""
    named = params(4, 2)
    opt = torch.optim.SGD([named[0][1]], lr=0.1)
    sched = StepLR(opt, step_size=1)
    assert add_phase_groups(opt, sched, phase_groups(named, 1, 1e-3, None, None)) == 1
    flat = [p for g in opt.param_groups for p in g["params"]]
    assert len(flat) == len({id(p) for p in flat}) == 2
    assert add_phase_groups(opt, sched, phase_groups(named, 1, 1e-3, None, None)) == 0
    assert len(opt.param_groups) == 2 and len(sched.base_lrs) == 2
    opt = torch.optim.SGD([named[0][1]], lr=0.1)
    split = phase_groups(named, 1, 1e-3, is_bias, None)
    assert add_phase_groups(opt, None, split) == 1  # the weight is owned: only the bias joins
    assert add_phase_groups(opt, None, split) == 0


def test_unsupported_scheduler_is_named_unless_allow_untested(caplog):
    (_, a), _ = params(4, 2)
    opt = torch.optim.SGD([a], lr=1.0, momentum=0.9)
    sched = CyclicLR(opt, base_lr=0.1, max_lr=1.0)
    with pytest.raises(FTSTransitionError) as err:
        check_scheduler(sched)
    assert str(err.value).startswith("LR scheduler CyclicLR is not supported: new param groups")
    check_scheduler(sched, allow_untested=True)
    assert "allowing untested LR scheduler CyclicLR" in caplog.text


def test_reinit_optimizer_in_place_keeps_identity_and_hooks():
    (n0, a), (n1, b) = params(5, 2)
    opt = torch.optim.AdamW([a], lr=1.0)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(len(sd["param_groups"])))
    a.grad = torch.ones_like(a)
    opt.step()
    groups = phase_groups([(n0, a)], 0, 0.3, None, None) + phase_groups(
        [(n1, b)], 1, 0.3, None, None
    )
    for g in groups:
        g.pop("initial_lr")
    same = reinit_optimizer(opt, torch.optim.SGD, {"lr": 0.3}, groups)
    assert same is opt and isinstance(opt, torch.optim.SGD) and len(opt.state) == 0
    assert [g["fts_phase"] for g in opt.param_groups] == [0, 1]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.3, 0.3]
    opt.load_state_dict(opt.state_dict())
    assert calls == [2]  # the pre-hook survived the transplant
    with pytest.raises(FTSTransitionError, match=r"cannot build optimizer SGD"):
        reinit_optimizer(opt, torch.optim.SGD, {"lr": 0.1, "momentun": 0.9}, groups)


def two_group_sgd(seed: int = 6):
    (_, a), (_, b) = params(seed, 2)
    opt = torch.optim.SGD(
        [{"params": [a], "lr": 0.5, "initial_lr": 1.0}, {"params": [b], "lr": 0.1}], lr=1.0
    )
    return opt


@pytest.mark.parametrize(
    "use_current,init_pg_lrs,lrs,initial",
    [
        (False, None, [1.0, 0.1], [1.0, 0.1]),  # FTS's default: initial_lr (or lr if none)
        (True, None, [0.5, 0.1], [1.0, 0.1]),  # use_current_optimizer_pg_lrs
        (False, [0.02], [0.02, 0.1], [0.02, 0.1]),  # init_pg_lrs sets lr and initial_lr
    ],
)
def test_start_lrs_follow_fts_precedence(use_current, init_pg_lrs, lrs, initial):
    opt = two_group_sgd()
    start_lrs(opt, use_current, init_pg_lrs)
    assert [g["lr"] for g in opt.param_groups] == lrs
    assert [g.get("initial_lr", g["lr"]) for g in opt.param_groups] == initial


@pytest.mark.parametrize("use_current", [False, True])
def test_init_pg_lrs_leave_the_groups_they_do_not_reach_at_their_current_lr(use_current):
    """FTS: init_pg_lrs replaces the list of starting lrs, so a group past its end neither
    restarts from initial_lr nor is touched at all (FTS run: [1e-6, 7e-6, 3e-6] at phase 2)."""
    (_, a), (_, b), (_, c) = params(8, 3)
    opt = torch.optim.SGD(
        [
            {"params": [a], "lr": 2.4e-4, "initial_lr": 1e-3},
            {"params": [b], "lr": 7e-6, "initial_lr": 1e-5},
            {"params": [c], "lr": 3e-6, "initial_lr": 3e-6},
        ],
        lr=1.0,
    )
    start_lrs(opt, use_current, [1e-6])
    assert [g["lr"] for g in opt.param_groups] == [1e-6, 7e-6, 3e-6]
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-6, 1e-5, 3e-6]


def test_reinit_scheduler_keeps_initial_lr_as_base():
    opt = two_group_sgd()
    sched = LambdaLR(opt, lambda s: 1.0)  # sets lr = initial_lr * 1.0
    opt.param_groups[0]["lr"] = 0.5  # as if it had decayed
    start_lrs(opt, True, None)
    reinit_scheduler(sched, opt, StepLR, {"step_size": 1, "gamma": 0.1}, "step", 1)
    assert isinstance(sched, StepLR) and sched.base_lrs == [1.0, 0.1]
    opt.step()
    sched.step()
    # StepLR is chainable: it continues from the (current) lrs it started at
    assert sched.get_last_lr() == pytest.approx([0.05, 0.01])


def test_paced_scheduler_steps_by_epoch_or_every_n_steps():
    opt = two_group_sgd()
    sched = LambdaLR(opt, lambda s: 1.0)
    reinit_scheduler(sched, opt, StepLR, {"step_size": 1, "gamma": 0.5}, "epoch", 1)
    assert type(sched).__name__ == "StepLR" and isinstance(sched, StepLR)
    for _ in range(3):  # the Trainer steps it every optimizer step: no effect
        opt.step()
        sched.step()
    assert sched.get_last_lr() == pytest.approx([1.0, 0.1])
    epoch_end(sched)
    assert sched.get_last_lr() == pytest.approx([0.5, 0.05])
    assert {"fts_interval", "fts_frequency", "fts_calls"} <= set(sched.state_dict())
    opt = two_group_sgd(7)
    sched = LambdaLR(opt, lambda s: 1.0)
    reinit_scheduler(sched, opt, StepLR, {"step_size": 1, "gamma": 0.5}, "step", 2)
    lrs = []
    for _ in range(4):
        opt.step()
        sched.step()
        epoch_end(sched)  # not epoch-paced: ignored
        lrs.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx([1.0, 0.5, 0.5, 0.25])


def test_rebuild_groups_restarts_step_lr_on_phase_0():
    """FTS's phase-0 override: new groups, optimizer state dropped, scheduler restarted."""
    (_, a), (nb, b), (nc, c) = params(8, 3)
    opt = torch.optim.SGD([a, b, c], lr=1e-3, weight_decay=1e-6)
    sched = StepLR(opt, step_size=1, gamma=0.7)
    a.grad = torch.ones_like(a)
    opt.step()
    sched.step()
    groups = phase_groups([(nb, b), (nc, c)], 0, opt.defaults["lr"], is_bias, None)
    rebuild_groups(opt, sched, groups)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]
    assert sched.last_epoch == 0 and sched.base_lrs == [1e-3, 1e-3]
    assert len(opt.state) == 0
    opt.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([7e-4, 7e-4])


def test_load_group_states_restores_common_groups_only():
    (_, a), (_, b) = params(10, 2)
    opt = torch.optim.AdamW([a], lr=1.0)
    a.grad = torch.ones_like(a)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as torch.load gives it: not the live tensors
    exp_avg = opt.state[a]["exp_avg"].clone()
    opt.add_param_group({"params": [b], "lr": 0.5})
    b.grad = torch.ones_like(b)
    a.grad = torch.ones_like(a)
    opt.step()
    assert load_group_states(opt, saved) is None
    assert torch.equal(opt.state[a]["exp_avg"], exp_avg) and b not in opt.state
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]  # lrs are not rolled back
    sgd = torch.optim.SGD([a], lr=1.0, momentum=0.9)
    assert load_group_states(sgd, saved) == (
        "it was written by another optimizer class (a reinitialized optimizer)"
    )

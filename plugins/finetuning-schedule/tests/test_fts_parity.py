"""Parity with Fine-Tuning Scheduler: its test tables, replayed under transformers.Trainer.

Each test names the FTS test (speediedan/finetuning-scheduler, tests/
test_finetuning_scheduler_callback.py) whose expected numbers it asserts. The boring model, its
SGD + StepLR and the scripted monitored metric are in fts_parity_models.py; a row of the epoch
tables is (depth, depth remaining, thawed tensors, param groups, tensors per group, optimizer
class, optimizer default lr), the columns FTS's tables have that a Trainer run also has, and the
lr of every param group. FTS's other columns (Lightning's checkpoint metadata, optimizer step
counters) have no Trainer counterpart.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import pytest
import torch
import yaml
from fts_parity_models import (
    BoringModel,
    LinearWarmupLR,
    MetricSequence,
    RandomRows,
    explicit_schedule,
    implicit_schedule,
    run_boring,
    sgd_steplr,
)
from transformers import Trainer, TrainerCallback, TrainingArguments

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration.testing import build_framework
from fms_acceleration_fts import FinetuningSchedulePlugin, FTSTransitionError

LOG = "fms_acceleration_fts"
# improves through epoch 3, worse from epoch 4 on (FTS's boring model with diverge_on_epoch=3)
DIVERGE_AT_4 = [4.0, 3.0, 2.0, 1.0] + [5.0 + i for i in range(40)]
# best at epoch 1, worse from epoch 2 on (diverge_on_epoch=1)
DIVERGE_AT_2 = [2.0, 1.0] + [3.0 + i for i in range(40)]
# best at epoch 2, worse from epoch 3 on (diverge_on_epoch=2; lr 0.1)
DIVERGE_AT_3 = [3.0, 2.0, 1.0] + [4.0 + i for i in range(40)]
STEP_07 = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}


def fts(**options):
    """A stanza: FTS without no_decay (one group per phase), patience 1, plus options."""
    stanza = {"no_decay": [], "early_stopping": {"patience": 1}}
    for key, value in options.items():
        if key == "patience":
            stanza["early_stopping"] = {"patience": value}
        else:
            stanza[key] = value
    return stanza


def table(rows: dict[int, tuple], first: int = 0) -> dict[int, tuple]:
    """FTS rows from epoch `first` on."""
    return {e: r for e, r in rows.items() if e >= first}


# ---------------------------------------------------------------- test_fts_explicit_implicit
# (explicit, max_depth): (stopped epoch, depth remaining, depth, epochs run, thawed, groups, lrs)
EXPIMP = {
    (True, -1): (5, 0, 2, 6, 8, 3, (0.001, 1e-06, 1e-05)),
    (False, -1): (7, 0, 3, 8, 8, 4, (0.001, 1e-05, 1e-05, 1e-05)),
    (True, 0): (4, 0, 0, 5, 4, 1, (0.001,)),
    (False, 0): (4, 0, 0, 5, 2, 1, (0.001,)),
    (True, 2): (5, 0, 2, 6, 8, 3, (0.001, 1e-06, 1e-05)),
    (False, 2): (6, 0, 2, 7, 6, 3, (0.001, 1e-05, 1e-05)),
    (True, 999): (5, 0, 2, 6, 8, 3, (0.001, 1e-06, 1e-05)),
    (False, 999): (7, 0, 3, 8, 8, 4, (0.001, 1e-05, 1e-05, 1e-05)),
}


@pytest.mark.parametrize("explicit,max_depth", list(EXPIMP))
def test_explicit_implicit_max_depth(tmp_path, explicit, max_depth):
    """FTS test_fts_explicit_implicit: early stopping keeps its best score across phases."""
    schedule = explicit_schedule() if explicit else None
    trainer, plugin, _ = run_boring(
        str(tmp_path), fts(ft_schedule=schedule, max_depth=max_depth), DIVERGE_AT_4, epochs=20
    )
    cb = plugin.callback
    stopped, remaining, depth, epochs, thawed, groups, lrs = EXPIMP[(explicit, max_depth)]
    assert round(trainer.state.epoch) == epochs and epochs - 1 == stopped
    assert cb.state.stopped is not None
    assert (cb.final_depth - cb.depth, cb.depth, len(cb.thawed_names())) == (
        remaining,
        depth,
        thawed,
    )
    optimizer = trainer.optimizer.optimizer
    assert len(optimizer.param_groups) == groups
    assert tuple(g["initial_lr"] for g in optimizer.param_groups) == pytest.approx(lrs)
    assert all(g["params"][0].requires_grad for g in optimizer.param_groups)


# ------------------------------------------------------------------------ test_fts_decay
# (explicit, no_decay ["bias"]): (stopped, remaining, depth, epochs, thawed, groups, group 2 wd)
DECAY = {
    (True, False): (5, 0, 2, 6, 8, 3, 1e-6),
    (True, True): (5, 0, 2, 6, 8, 5, 0.0),
    (False, False): (7, 0, 3, 8, 8, 4, 1e-6),
    (False, True): (7, 0, 3, 8, 8, 7, 0.0),
}


@pytest.mark.parametrize("explicit,no_decay", list(DECAY))
def test_decay_groups(tmp_path, explicit, no_decay):
    """FTS test_fts_decay: new groups take the optimizer's weight decay; no_decay names get 0."""
    stanza = fts(ft_schedule=explicit_schedule() if explicit else None)
    stanza["no_decay"] = ["bias"] if no_decay else []
    trainer, plugin, _ = run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=20)
    stopped, remaining, depth, _, thawed, groups, wd = DECAY[(explicit, no_decay)]
    cb = plugin.callback
    assert round(trainer.state.epoch) - 1 == stopped and (cb.depth, len(cb.thawed_names())) == (
        depth,
        thawed,
    )
    optimizer = trainer.optimizer.optimizer
    assert (cb.final_depth - cb.depth, len(optimizer.param_groups)) == (remaining, groups)
    assert optimizer.param_groups[2]["weight_decay"] == wd


# ------------------------------------------------- test_fts_intrafit / test_fts_nolrs_intrafit
# epoch: (depth, remaining, thawed, groups)
INTRAFIT = {e: (0, 3, 2, 1) for e in range(5)} | {5: (1, 2, 4, 2), 6: (2, 1, 6, 3), 7: (3, 0, 8, 4)}
NOLRS = {e: (0, 3, 2, 1) for e in range(4)} | {4: (1, 2, 4, 2), 5: (2, 1, 6, 3), 6: (3, 0, 8, 4)}
NOLRS_LRS = {e: (0.1,) for e in range(4)} | {
    4: (0.1, 1e-05),
    5: (0.1, 1e-05, 1e-05),
    6: (0.1, 1e-05, 1e-05, 1e-05),
}


def short(row: tuple) -> tuple:
    return row[:4]


@pytest.mark.parametrize("restore_best", [True, False], ids=["restore_best", "no_restore_best"])
def test_intrafit(tmp_path, restore_best):
    """FTS test_fts_intrafit: the implicit schedule, epoch by epoch, with and without
    restore_best (the weights a restore loads do not change the path)."""
    save = {"save_strategy": "epoch"} if restore_best else {}
    _, plugin, rec = run_boring(
        str(tmp_path), fts(restore_best=restore_best), DIVERGE_AT_4, epochs=20, **save
    )
    assert {e: short(r) for e, r in rec.rows.items()} == INTRAFIT
    assert [t["depth"] for t in plugin.callback.state.transitions] == [1, 2, 3]


def test_no_lr_scheduler(tmp_path):
    """FTS test_fts_nolrs_intrafit: SGD lr 0.1 and no scheduler of the user's (the Trainer's
    constant schedule)."""

    def sgd(model):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), None

    _, _, rec = run_boring(
        str(tmp_path), fts(), DIVERGE_AT_3, epochs=20, optimizers=sgd, lr_scheduler_type="constant"
    )
    assert {e: short(r) for e, r in rec.rows.items()} == NOLRS
    assert rec.lrs == NOLRS_LRS


# ---------------------------------------------------------------------- test_fts_reinit_optim
COMMON_LRS = {0: (0.001,), 1: (0.0007,), 2: (0.00049,), 3: (0.000343,)}
COMMON_OPT = {e: (0, 3, 2, 1, (2,), "SGD", 0.001) for e in range(4)}


def opt_rows(cls4: str, lr4: float, cls6: str, lr6: float) -> dict[int, tuple]:
    return {
        **COMMON_OPT,
        4: (1, 2, 4, 2, (2, 2), cls4, lr4),
        5: (1, 2, 4, 2, (2, 2), cls4, lr4),
        6: (2, 1, 6, 3, (2, 2, 2), cls6, lr6),
        7: (2, 1, 6, 3, (2, 2, 2), cls6, lr6),
        8: (3, 0, 8, 4, (2, 2, 2, 2), cls6, lr6),
        9: (3, 0, 8, 4, (2, 2, 2, 2), cls6, lr6),
    }


ADAM_21 = {"optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"lr": 2.1e-04}}}
ADAM_22 = {"optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"lr": 2.2e-04}}}
SGD_2 = {
    "optimizer_init": {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 2.0e-03, "momentum": 0.9, "weight_decay": 2.0e-06},
    }
}
PL_EPOCH = {"interval": "epoch", "frequency": 1, "name": "Custom_Reinit_LR"}


def reinit_schedule(optimizer: bool, lr_scheduler: bool, use_current: bool) -> dict:
    """FTS's reinit fixtures on the implicit schedule (boring_ft_schedule[6], [7], [10])."""
    sched = implicit_schedule()
    if optimizer:
        sched[1]["new_optimizer"] = ADAM_21
        sched[2]["new_optimizer"] = SGD_2
    if lr_scheduler:
        sched[1]["new_lr_scheduler"] = {
            "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.7}},
            "pl_lrs_cfg": PL_EPOCH,
        }
        sched[2]["lr"] = 3.0e-06
        sched[2]["new_lr_scheduler"] = {
            "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.2}},
            "pl_lrs_cfg": PL_EPOCH,
        }
        if use_current:
            sched[2]["new_lr_scheduler"]["use_current_optimizer_pg_lrs"] = True
    return sched


IMPLICIT_LR = {
    "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.5}},
    "pl_lrs_cfg": PL_EPOCH,
}
# a rebuilt optimizer alone: every group keeps following StepLR(gamma 0.7), new groups at 1e-5
OPTIMIZER_ONLY_LRS = {
    4: (0.0002401, 1e-05),
    5: (0.00016807, 7e-06),
    6: (0.000117649, 4.9e-06, 1e-05),
    7: (8.2354e-05, 3.43e-06, 7e-06),
    8: (5.7648e-05, 2.401e-06, 4.9e-06, 1e-05),
    9: (4.0354e-05, 1.681e-06, 3.43e-06, 7e-06),
}
# (explicit, optimizer only, use current lrs): (rows, lrs)
REINIT_OPTIM = {
    (True, True, False): (
        opt_rows("Adam", 0.00021, "SGD", 0.002),
        OPTIMIZER_ONLY_LRS,
    ),
    (True, False, False): (
        opt_rows("Adam", 0.00021, "SGD", 0.002),
        {
            4: (0.00021, 1e-05),
            5: (0.000147, 7e-06),
            6: (0.002, 1e-05, 3e-06),
            7: (0.0004, 2e-06, 6e-07),
            8: (8e-05, 4e-07, 1.2e-07, 1e-05),
            9: (1.6e-05, 8e-08, 2.4e-08, 2e-06),
        },
    ),
    (False, True, False): (
        opt_rows("Adam", 0.00022, "Adam", 0.00022),
        OPTIMIZER_ONLY_LRS,
    ),
    (False, False, False): (
        opt_rows("Adam", 0.00022, "Adam", 0.00022),
        {
            4: (0.00022, 1e-05),
            5: (0.00011, 5e-06),
            6: (0.00022, 1e-05, 1e-05),
            7: (0.00011, 5e-06, 5e-06),
            8: (0.00022, 1e-05, 1e-05, 1e-05),
            9: (0.00011, 5e-06, 5e-06, 5e-06),
        },
    ),
    (True, False, True): (
        opt_rows("Adam", 0.00021, "SGD", 0.002),
        {
            4: (0.00021, 1e-05),
            5: (0.000147, 7e-06),
            6: (0.0001029, 4.9e-06, 3e-06),
            7: (2.058e-05, 9.8e-07, 6e-07),
            8: (4.116e-06, 1.96e-07, 1.2e-07, 1e-05),
            9: (8.23e-07, 3.9e-08, 2.4e-08, 2e-06),
        },
    ),
    (False, False, True): (
        opt_rows("Adam", 0.00022, "Adam", 0.00022),
        {
            4: (0.0002401, 1e-05),
            5: (0.00012005, 5e-06),
            6: (6.0025e-05, 2.5e-06, 1e-05),
            7: (3.0012e-05, 1.25e-06, 5e-06),
            8: (1.5006e-05, 6.25e-07, 2.5e-06, 1e-05),
            9: (7.503e-06, 3.13e-07, 1.25e-06, 5e-06),
        },
    ),
}


def close(got: dict[int, tuple], want: dict[int, tuple]) -> None:
    assert set(got) >= set(want), (sorted(got), sorted(want))
    for epoch, lrs in want.items():
        assert got[epoch] == pytest.approx(lrs, rel=2e-4, abs=1e-12), (epoch, got[epoch], lrs)


@pytest.mark.parametrize("explicit,optimizer_only,use_current", list(REINIT_OPTIM))
def test_reinit_optimizer(tmp_path, explicit, optimizer_only, use_current):
    """FTS test_fts_reinit_optim: a rebuilt optimizer keeps every group's current lr (its
    phase-0 groups' initial_lr is the new optimizer's lr); a rebuilt scheduler restarts them
    from initial_lr, or from their current lr (use_current_optimizer_pg_lrs)."""
    if explicit:
        stanza = fts(ft_schedule=reinit_schedule(True, not optimizer_only, use_current), patience=2)
    else:
        stanza = fts(reinit_optim_cfg=ADAM_22, patience=2)
        if not optimizer_only:
            stanza["reinit_lr_cfg"] = {**IMPLICIT_LR, "use_current_optimizer_pg_lrs": use_current}
    _, plugin, rec = run_boring(str(tmp_path), stanza, DIVERGE_AT_2, epochs=20)
    rows, lrs = REINIT_OPTIM[(explicit, optimizer_only, use_current)]
    assert sorted(rec.rows) == list(range(10)) and plugin.callback.depth == 3
    for epoch, row in rows.items():
        assert rec.rows[epoch][:5] == row[:5] and rec.rows[epoch][5] == row[5], epoch
        assert rec.rows[epoch][6] == pytest.approx(row[6])
    close(rec.lrs, {**COMMON_LRS, **lrs})


def test_reinit_optimizer_no_decay(tmp_path):
    """FTS test_fts_reinit_optimlr_nodecay with no_decay ["bias"]: weight and bias groups.

    A deliberate difference (README): the rebuilt optimizer keeps the user's phase-0 group (2
    tensors) where FTS splits it by no_decay into two; every other group has FTS's lr. (FTS's
    epoch-8 row also merges phase 2's two groups into one, an artifact of its restore_best.)
    """
    stanza = fts(ft_schedule=reinit_schedule(True, True, False), patience=2)
    stanza["no_decay"] = ["bias"]
    _, _, rec = run_boring(str(tmp_path), stanza, DIVERGE_AT_2, epochs=20)
    # the user's phase-0 optimizer had one group; FTS keeps it as one (2 tensors)
    assert rec.rows[4][3:5] == (3, (2, 1, 1))
    assert rec.rows[6][3:5] == (5, (2, 1, 1, 1, 1))
    assert rec.rows[8][3:5] == (7, (2, 1, 1, 1, 1, 1, 1))
    close(
        rec.lrs,
        {
            **COMMON_LRS,
            4: (0.00021, 1e-05, 1e-05),
            5: (0.000147, 7e-06, 7e-06),
            6: (0.002, 1e-05, 1e-05, 3e-06, 3e-06),
            7: (0.0004, 2e-06, 2e-06, 6e-07, 6e-07),
            8: (8e-05, 4e-07, 4e-07, 1.2e-07, 1.2e-07, 1e-05, 1e-05),
            9: (1.6e-05, 8e-08, 8e-08, 2.4e-08, 2.4e-08, 2e-06, 2e-06),
        },
    )


def test_reinit_optimizer_with_lambda_lr(tmp_path):
    """FTS test_fts_reinit_optim_special_lr[lambdalr]: 64 steps per epoch; the new LambdaLR
    steps per optimizer step (interval step), the rebuilt SGD keeps its lrs on it."""
    sched = reinit_schedule(True, True, False)
    sched[1]["new_lr_scheduler"] = {
        "lr_scheduler_init": {
            "class_path": "fts_parity_models.LinearWarmupLR",
            "init_args": {"num_warmup_steps": 100, "num_training_steps": 1000},
        },
        "pl_lrs_cfg": {"interval": "step", "frequency": 1, "name": "Custom_Reinit_LR"},
    }
    del sched[2]["new_lr_scheduler"]
    _, _, rec = run_boring(
        str(tmp_path), fts(ft_schedule=sched, patience=2), DIVERGE_AT_2, epochs=20,
        steps_per_epoch=64, optimizers=sgd_steplr(64),
    )  # fmt: skip
    assert [rec.rows[e][5] for e in (3, 4, 6)] == ["SGD", "Adam", "SGD"]
    close(
        rec.lrs,
        {
            **COMMON_LRS,
            4: (0.0, 0.0),
            5: (0.0001344, 6.4e-06),
            6: (0.000203467, 9.689e-06, 3e-06),
            7: (0.000188533, 8.978e-06, 2.693e-06),
            8: (0.0001736, 8.267e-06, 2.48e-06, 1e-05),
            9: (0.000158667, 7.556e-06, 2.267e-06, 7.556e-06),
        },
    )


def rlrop(patience: int, min_lr=None, init_pg_lrs=None) -> dict:
    init = {"patience": patience} if min_lr is None else {"patience": patience, "min_lr": min_lr}
    cfg = {
        "lr_scheduler_init": {
            "class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
            "init_args": init,
        },
        "pl_lrs_cfg": {**PL_EPOCH, "monitor": "eval_loss"},
    }
    if init_pg_lrs is not None:
        cfg["init_pg_lrs"] = init_pg_lrs
    return cfg


def test_reinit_optimizer_with_plateau(tmp_path):
    """FTS test_fts_reinit_optim_special_lr[rlrop]: ReduceLROnPlateau (min_lr per group) with
    a rebuilt optimizer; it reduces after two bad evaluations, not after an improvement."""
    sched = reinit_schedule(True, True, False)
    sched[1]["new_lr_scheduler"] = rlrop(1, [2.0e-07, 1.0e-07], [1.5e-06])
    del sched[2]["new_lr_scheduler"]
    metrics = [5.0, 1.0, 2.0, 3.0, 4.0, 4.5, 4.6, 3.5, 3.9, 4.1]
    _, _, rec = run_boring(
        str(tmp_path), fts(ft_schedule=sched, patience=2), metrics, epochs=10,
        metric_for_best_model="eval_loss",
    )  # fmt: skip
    close(
        rec.lrs,
        {
            **COMMON_LRS,
            4: (1.5e-06, 1e-05),
            5: (1.5e-06, 1e-05),
            6: (1.5e-06, 1e-05, 3e-06),
            7: (2e-07, 1e-06, 3e-07),
            8: (2e-07, 1e-06, 3e-07, 1e-05),
            9: (2e-07, 1e-06, 3e-07, 1e-05),
        },
    )


# --------------------------------------------------------------------------- test_fts_reinitlr
REINITLR = {
    True: {
        **COMMON_LRS,
        4: (0.0002401,),
        5: (0.001, 1e-05),
        6: (1e-06, 2e-06, 3e-06),
        7: (1e-06, 2e-06, 3e-06, 1e-05),
    },
    False: {
        **COMMON_LRS,
        4: (0.0002401,),
        5: (0.001, 1e-05),
        6: (0.001, 1e-05, 1e-05),
        7: (0.001, 1e-05, 1e-05, 1e-05),
    },
}


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
def test_reinit_lr_scheduler(tmp_path, explicit):
    """FTS test_fts_reinitlr: a rebuilt scheduler restarts existing groups from their
    initial_lr (1e-3, not the 2.4e-4 they had decayed to); init_pg_lrs sets the first groups."""
    if explicit:
        sched = implicit_schedule()
        sched[1]["new_lr_scheduler"] = {
            "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.7}},
            "pl_lrs_cfg": PL_EPOCH,
        }
        sched[2]["lr"] = 3.0e-06
        sched[2]["new_lr_scheduler"] = {
            "lr_scheduler_init": {
                "class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
                "init_args": {"T_0": 1, "T_mult": 2, "eta_min": 1.0e-07},
            },
            "pl_lrs_cfg": PL_EPOCH,
            "init_pg_lrs": [1.0e-06, 2.0e-06],
        }
        stanza = fts(ft_schedule=sched)
    else:
        stanza = fts(
            reinit_lr_cfg={
                "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.7}},
                "pl_lrs_cfg": PL_EPOCH,
            }
        )
    _, plugin, rec = run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=20)
    assert plugin.callback.depth == 3 and sorted(rec.lrs) == list(range(8))
    close(rec.lrs, REINITLR[explicit])


LAMBDALR = {
    (True, True): (0.0, 6.4e-07, 1.28e-06, 1.229e-06, 6.4e-06),
    (True, False): (0.0, 6.4e-07, 1.28e-06, 1.92e-06, 1e-05),
    (False, False): (0.0, 0.0, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("explicit,apply", list(LAMBDALR))
def test_reinit_lambda_lr(tmp_path, explicit, apply):
    """FTS test_fts_reinitlr_lambda: apply_lambdas_new_pgs scales a new group by the current
    lambda (and takes that as its initial_lr); 64 steps per epoch."""
    warmup = {
        "lr_scheduler_init": {
            "class_path": "fts_parity_models.LinearWarmupLR",
            "init_args": {"num_warmup_steps": 100, "num_training_steps": 1000},
        },
        "pl_lrs_cfg": {"interval": "step", "frequency": 1, "name": "Custom_Reinit_LR"},
    }
    if explicit:
        sched = implicit_schedule()
        sched[1]["new_lr_scheduler"] = warmup
        sched[2]["lr"] = 3.0e-06
        sched[2]["new_lr_scheduler"] = {**warmup, "init_pg_lrs": [1.0e-06, 2.0e-06]}
        stanza = fts(ft_schedule=sched, apply_lambdas_new_pgs=apply)
    else:
        stanza = fts(reinit_lr_cfg=warmup, apply_lambdas_new_pgs=apply)
    _, _, rec = run_boring(
        str(tmp_path), stanza, DIVERGE_AT_4, epochs=20, steps_per_epoch=64,
        optimizers=sgd_steplr(64),
    )  # fmt: skip
    e5, *e7 = LAMBDALR[(explicit, apply)]
    close(
        rec.lrs,
        {**COMMON_LRS, 4: (0.0002401,), 5: (e5, e5), 6: (0.0, 0.0, 0.0), 7: tuple(e7)},
    )


# ------------------------------------------------------------------ test_fts_reinitlr_rlrop
def test_reinit_plateau_explicit(tmp_path):
    """FTS test_fts_reinitlr_rlrop[exp_rlrop]: epoch transitions; ReduceLROnPlateau with
    init_pg_lrs and per-group min_lr reduces after two evaluations short of its threshold,
    while early stopping (min_delta 0) still counts them as improvements."""
    sched = implicit_schedule()
    sched[0]["max_transition_epoch"] = 4
    sched[1]["max_transition_epoch"] = 8
    sched[1]["new_lr_scheduler"] = rlrop(1, [2.0e-07, 1.0e-07], [1.5e-06])
    sched[2]["lr"] = 3.0e-06
    sched[2]["max_transition_epoch"] = 10
    sched[2]["new_lr_scheduler"] = {
        "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "gamma": 0.7}},
        "pl_lrs_cfg": PL_EPOCH,
        "init_pg_lrs": [2.0e-06, 3.0e-06],
    }
    metrics = [1.0 - 1e-6 * e for e in range(10)]
    _, _, rec = run_boring(
        str(tmp_path), fts(ft_schedule=sched, max_depth=2, patience=5), metrics, epochs=10,
        metric_for_best_model="eval_loss",
    )  # fmt: skip
    close(
        rec.lrs,
        {
            **COMMON_LRS,
            4: (1.5e-06, 1e-05),
            5: (1.5e-06, 1e-05),
            6: (1.5e-06, 1e-05),
            7: (2e-07, 1e-06),
            8: (2e-06, 3e-06, 3e-06),
            9: (1.4e-06, 2.1e-06, 2.1e-06),
        },
    )


def test_reinit_plateau_implicit(tmp_path):
    """FTS test_fts_reinitlr_rlrop[imp_rlrop]: the user's ReduceLROnPlateau in phase 0, a new
    one at every phase (reinit_lr_cfg); groups without initial_lr restart from their lr."""

    def sgd_plateau(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2)

    _, plugin, rec = run_boring(
        str(tmp_path), fts(reinit_lr_cfg=rlrop(1), max_depth=2, patience=4), DIVERGE_AT_3,
        epochs=99, optimizers=sgd_plateau, metric_for_best_model="eval_loss",
    )  # fmt: skip
    assert plugin.callback.depth == 2 and max(rec.lrs) == 14
    assert rec.lrs == {
        **{e: (0.001,) for e in range(6)},
        6: (0.0001,),
        7: (0.0001, 1e-05),
        8: (0.0001, 1e-05),
        9: (0.0001, 1e-05),
        10: (1e-05, 1e-06),
        11: (1e-05, 1e-05, 1e-05),
        12: (1e-05, 1e-05, 1e-05),
        13: (1e-05, 1e-05, 1e-05),
        14: (1e-06, 1e-06, 1e-06),
    }


# ---------------------------------------------------------------------- test_fts_enforce_p0
ENFORCE_ROWS = {e: (0, 2, 2, 2) for e in range(5)} | {5: (1, 1, 4, 4), 6: (2, 0, 6, 6)}
ENFORCE_LRS = {
    "step_lr": {
        0: (0.001, 0.001),
        1: (0.0007, 0.0007),
        2: (0.00049, 0.00049),
        3: (0.000343, 0.000343),
        4: (0.0002401, 0.0002401),
        5: (0.00016807, 0.00016807, 1e-05, 1e-05),
        6: (0.000117649, 0.000117649, 7e-06, 7e-06, 1e-05, 1e-05),
    },
    "rlrop": {e: (0.001, 0.001) for e in range(5)}
    | {5: (0.001, 0.001, 1e-05, 1e-05), 6: (0.001, 0.001, 1e-05, 1e-05, 1e-05, 1e-05)},
    "lr_lambdas": {
        0: (0.0, 0.0),
        1: (0.000213333, 0.000213333),
        2: (0.000426667, 0.000426667),
        3: (0.00064, 0.00064),
        4: (0.000853333, 0.000853333),
        5: (0.000971429, 0.000971429, 1e-05, 1e-05),
        6: (0.00088, 0.00088, 8.8e-06, 8.8e-06, 1e-05, 1e-05),
    },
}


@pytest.mark.parametrize("init", list(ENFORCE_LRS))
def test_enforce_phase0_params(tmp_path, init, caplog):
    """FTS test_fts_enforce_p0: a user optimizer over the wrong tensors (step_lr: phase 3's,
    after thawing them by hand) or over all of them is rebuilt for phase 0 (split by
    no_decay, at the optimizer's default lr) and its scheduler restarted."""
    steps = 64 if init == "lr_lambdas" else 1

    def wrong_tensors(model):
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.0."))

    def optimizers(model):
        params = [p for p in model.parameters() if p.requires_grad]
        if init != "step_lr":
            params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=1e-3, weight_decay=1e-6)
        if init == "step_lr":
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        if init == "rlrop":
            return opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2)
        return opt, LinearWarmupLR(opt, num_warmup_steps=300, num_training_steps=1000)

    stanza = fts(max_depth=2)
    stanza["no_decay"] = ["bias"]
    with caplog.at_level(logging.INFO, logger=LOG):
        _, plugin, rec = run_boring(
            str(tmp_path), stanza, DIVERGE_AT_4, epochs=20, steps_per_epoch=steps,
            optimizers=optimizers, metric_for_best_model="eval_loss",
            before_optimizer=wrong_tensors if init == "step_lr" else None,
        )  # fmt: skip
    assert {e: short(r) for e, r in rec.rows.items()} == ENFORCE_ROWS
    close(rec.lrs, ENFORCE_LRS[init])
    assert "as enforce_phase0_params is true it now optimizes exactly the phase-0" in caplog.text
    assert plugin.callback.depth == 2


@pytest.mark.parametrize(
    "case,message",
    [
        ("extra_nograd", "6 outside phase 0, 6 not requiring grad"),
        ("grad_diff", "6 outside phase 0, 0 not requiring grad"),
    ],
)
def test_optimizer_differs_from_phase0_without_enforcement(tmp_path, caplog, case, message):
    """FTS test_fts_optimizer_init_params (enforce_phase0_params false): a warning that
    summarizes the difference; the optimizer is used as built."""

    def thaw_all(model):
        if case == "grad_diff":
            for p in model.parameters():
                p.requires_grad_(True)

    def optimizers(model):
        params = list(model.parameters())
        if case == "grad_diff":
            params = [p for p in params if p.requires_grad]
        return torch.optim.SGD(params, lr=1e-3), None

    with caplog.at_level(logging.WARNING, logger=LOG):
        _, _, rec = run_boring(
            str(tmp_path), fts(enforce_phase0_params=False, max_depth=0), DIVERGE_AT_4,
            epochs=1, optimizers=optimizers, before_optimizer=thaw_all,
        )  # fmt: skip
    assert "enforce_phase0_params is false, so it is used as built" in caplog.text
    assert message in caplog.text
    assert rec.rows[0][3:5] == (1, (8,))


# ------------------------------------------------------------------ test_fts_epoch_trans_only
def test_epoch_transitions_only(tmp_path):
    """FTS test_fts_epoch_trans_only[eponly]: epochs 3, 2, 2 (a phase whose limit is not above
    the previous one lasts one epoch); six epochs."""
    sched = explicit_schedule()
    sched[1]["max_transition_epoch"] = 2
    sched[2]["max_transition_epoch"] = 2
    _, plugin, rec = run_boring(
        str(tmp_path), fts(ft_schedule=sched, epoch_transitions_only=True), DIVERGE_AT_4, epochs=6
    )
    assert [r[0] for _, r in sorted(rec.rows.items())] == [0, 0, 0, 1, 2, 2]
    cb = plugin.callback
    assert (cb.final_depth - cb.depth, cb.depth, len(cb.thawed_names())) == (0, 2, 8)
    assert rec.rows[5][3] == 3


def test_epoch_transitions_only_needs_epochs():
    """FTS test_fts_epoch_trans_only[noeponly]: phases without max_transition_epoch."""
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(
            {
                "plugins": {
                    "training": {
                        "finetuning_schedule": {
                            "ft_schedule": explicit_schedule(),
                            "epoch_transitions_only": True,
                        }
                    }
                }
            },
            [FinetuningSchedulePlugin],
        )
    assert str(err.value).endswith(
        "plugins.training.finetuning_schedule.ft_schedule: phase 1: epoch_transitions_only is "
        "set, so every phase but the last needs max_transition_epoch >= 0"
    )


# ------------------------------------------------------------------- test_fts_constant_loss
def test_constant_metric(tmp_path):
    """FTS test_fts_constant_loss[constant_loss]: a constant metric never improves: one phase
    per epoch, then stop; five epochs of six."""
    trainer, plugin, _ = run_boring(str(tmp_path), fts(), [1.0] * 10, epochs=6)
    assert round(trainer.state.epoch) == 5
    assert (plugin.callback.depth, plugin.callback.final_depth) == (3, 3)


# ---------------------------------------------------- early stopping: non-finite, thresholds
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_early_stopping_on_non_finite_monitor(tmp_path, bad):
    """FTS test_early_stopping_on_non_finite_monitor: stops at the epoch of the NaN / inf."""
    trainer, plugin, _ = run_boring(
        str(tmp_path), fts(max_depth=0), [4.0, 3.0, bad, 2.0, 1.0], epochs=10
    )
    assert round(trainer.state.epoch) - 1 == 2
    stopped = plugin.callback.state.stopped
    assert stopped.startswith(f"monitored metric eval_loss = {bad} is not finite")


@pytest.mark.parametrize(
    "stopping,divergence,losses,expected",
    [
        (None, None, [8, 4, 2, 3, 4, 5, 8, 10], 5),
        (2.9, None, [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 8),
        (None, 15.9, [9, 4, 2, 16, 32, 64], 3),
    ],
    ids=["patience", "stopping_threshold", "divergence_threshold"],
)
def test_early_stopping_thresholds(tmp_path, stopping, divergence, losses, expected):
    """FTS test_early_stopping_thresholds (patience 3, the default)."""
    stanza = {
        "max_depth": 0,
        "early_stopping": {"stopping_threshold": stopping, "divergence_threshold": divergence},
    }
    trainer, _, _ = run_boring(str(tmp_path), stanza, [float(v) for v in losses], epochs=20)
    assert round(trainer.state.epoch) - 1 == expected


# ----------------------------------------------------------- test_fts_frozen_bn_track_running_stats
BN_SCHEDULE = {
    0: {
        "params": ["model.lin_classif.bias", "model.lin_classif.weight"],
        "max_transition_epoch": 1,
    },
    1: {"params": ["model.bn.bias", "model.bn.weight"], "max_transition_epoch": 2},
    2: {"params": ["model.lin_base.bias", "model.lin_base.weight"]},
}
# (track_running_stats, bn.weight.requires_grad, num_batches_tracked) per epoch (FTS's table has
# the train/eval mode too: a Lightning loop detail)
BN_STATE = {
    True: {
        "0_train": (True, False, 0),
        "0_val": (True, False, 32),
        "1_train": (True, True, 32),
        "1_val": (True, True, 64),
        "2_train": (True, True, 64),
        "2_val": (True, True, 96),
    },
    False: {
        "0_train": (False, False, 0),
        "0_val": (False, False, 0),
        "1_train": (True, True, 0),
        "1_val": (True, True, 32),
        "2_train": (True, True, 0),
        "2_val": (True, True, 32),
    },
}


@pytest.mark.parametrize("track", [True, False], ids=["frozen_bn_track", "no_frozen_bn_track"])
def test_frozen_batchnorm_running_stats(tmp_path, track):
    """FTS test_fts_frozen_bn_track_running_stats (restore_best, 32 steps per epoch): a frozen
    BatchNorm keeps tracking running statistics unless frozen_bn_track_running_stats is false;
    then it starts when its phase thaws. The metric makes the latest checkpoint the best with
    tracking, the first one without (as in FTS's runs)."""
    model = BoringModel(batchnorm=True)
    seen: dict[str, tuple] = {}

    def state(m) -> tuple:
        bn = m.model.bn
        return (bn.track_running_stats, bn.weight.requires_grad, int(bn.num_batches_tracked))

    class Inspect(TrainerCallback):
        def on_epoch_begin(self, args, s, control, model=None, **kw):
            seen[f"{round(s.epoch)}_train"] = state(model)

        def on_evaluate(self, args, s, control, model=None, **kw):
            seen[f"{round(s.epoch) - 1}_val"] = state(model)

    stanza = {
        "ft_schedule": BN_SCHEDULE,
        "restore_best": True,
        "frozen_bn_track_running_stats": track,
        "early_stopping": {"patience": 1},
    }
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3,
        eval_strategy="epoch", save_strategy="epoch", logging_strategy="no", report_to=[],
        use_cpu=True, seed=42, data_seed=42, disable_tqdm=True,
    )  # fmt: skip
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": stanza}}}, [FinetuningSchedulePlugin]
    )
    model, _ = framework.augmentation(model, args, modifiable_args=())
    metrics = [3.0, 2.0, 1.0] if track else [1.0, 2.0, 3.0]
    data = RandomRows(64, seed=0)
    trainer = Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=RandomRows(4, seed=1),
        callbacks=[MetricSequence(metrics)],
    )  # fmt: skip
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    trainer.add_callback(Inspect())
    trainer.train()
    assert seen == BN_STATE[track]
    # with momentum=None the running mean is the mean of every batch tracked: epoch 0's 32
    # batches of lin_base(x), lin_base being frozen (and so equal to checkpoint-32's) then
    if track:
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "checkpoint-32" / "model.safetensors"))
        hidden = torch.nn.functional.linear(
            data.x, saved["model.lin_base.weight"], saved["model.lin_base.bias"]
        )
        assert saved["model.bn.running_mean"] == pytest.approx(hidden.mean(0), abs=1e-6)


# ------------------------------------------------------------------------ test_fts_log_dir
@pytest.mark.parametrize("log_dir", [True, False], ids=["fts_log_dir", "no_fts_log_dir"])
def test_log_dir(tmp_path, log_dir):
    """FTS test_fts_log_dir: the generated schedule goes to log_dir, else the run's folder."""
    stanza = fts(max_depth=0)
    if log_dir:
        stanza["log_dir"] = str(tmp_path / "fts_logs")
    run_boring(str(tmp_path / "out"), stanza, DIVERGE_AT_4, epochs=1)
    where = tmp_path / ("fts_logs" if log_dir else "out")
    assert (
        yaml.safe_load((where / "BoringModel_ft_schedule.yaml").read_text()) == implicit_schedule()
    )


# --------------------------------------------------------------------- test_fts_gen_ft_schedule
class ConvBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, parent_param: bool = False) -> None:
        super().__init__()
        if parent_param:  # FTS's ConvBlockParam: a parameter on a non-leaf module
            self.module_dict = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(cin, cout, 3)})
            self.parent_param = torch.nn.Parameter(torch.zeros(1))
        else:
            self.conv = torch.nn.Conv2d(cin, cout, 3)
        self.bn = torch.nn.BatchNorm2d(cout)


class Nested(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        encoder = torch.nn.Sequential(ConvBlock(3, 64, True), ConvBlock(64, 128))
        self.test = torch.nn.Sequential(
            OrderedDict([("encoder", encoder), ("decoder", ConvBlock(128, 10))])
        )


class Rnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(10, 20, batch_first=True)
        self.linear_out = torch.nn.Linear(20, 5)


@pytest.mark.parametrize(
    "make,expected",
    [
        (BoringModel, (4, ["model.2.bias", "model.2.weight"], ["model.0.bias", "model.0.weight"])),
        (Rnn, (3, ["rnn.bias_hh_l0", "rnn.bias_ih_l0"], ["rnn.weight_hh_l0", "rnn.weight_ih_l0"])),
        (
            Nested,
            (
                7,
                ["test.decoder.conv.bias", "test.decoder.conv.weight"],
                ["test.encoder.0.parent_param"],
            ),
        ),
    ],
    ids=["Boring", "ParityRNN", "ComplexNested"],
)
def test_default_schedule_layout(make, expected):
    """FTS test_fts_gen_ft_schedule: reverse parameter order, two per phase, last odd one alone."""
    from fms_acceleration_adapters import StrategyAdapter

    sched = StrategyAdapter().gen_default_schedule(make())
    n, phase1, last = expected
    assert len(sched) == n and sched[1]["params"] == phase1 and sched[n - 1]["params"] == last


# --------------------------------------------------------- test_fts_init_lrs_misconfiguration
@pytest.mark.parametrize("allow", [True, False], ids=["allow_untested_lrs", "unsupported_lrs"])
def test_unsupported_initial_scheduler(tmp_path, caplog, allow):
    """FTS test_fts_init_lrs_misconfiguration: refused before step 0 unless allow_untested."""

    def cyclic(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        return opt, torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3)

    stanza = fts(allow_untested=allow, max_depth=0)
    if not allow:
        with pytest.raises(FTSTransitionError) as err:
            run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=1, optimizers=cyclic)
        assert str(err.value).startswith("LR scheduler CyclicLR is not supported: new param")
        return
    with caplog.at_level(logging.WARNING, logger=LOG):
        trainer, _, _ = run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=1, optimizers=cyclic)
    assert "allowing untested LR scheduler CyclicLR because allow_untested is true" in caplog.text
    assert trainer.state.global_step == 1


# ------------------------------------------------------------- test_fts_distributed_compat
class _Accelerator:
    """What the plugin reads of an accelerate Accelerator (a distributed type and a method)."""

    def __init__(self, distributed_type: str) -> None:
        self.distributed_type = distributed_type
        self.is_main_process = True

    def prepare_optimizer(self, optimizer, *args, **kwargs):
        return optimizer


@pytest.mark.parametrize(
    "options,outcome",
    [
        ({"allow_untested": True}, "StrategyAdapter"),
        ({}, "has not been adapted to or tested with the distributed strategy 'xla'"),
        (
            {"custom_strategy_adapters": {"xla": "fms_acceleration_adapters.FSDPStrategyAdapter"}},
            "FSDPStrategyAdapter",
        ),
        (
            {"custom_strategy_adapters": {"xla": "fms_acceleration_adapters.IAmMissing"}},
            "custom_strategy_adapters.xla: strategy adapter",
        ),
        # FTS's csa_not_found: a key that is no strategy is refused (here when the framework is
        # built, naming the key and its value)
        (
            {
                "custom_strategy_adapters": {
                    "IAmMissing": "fms_acceleration_adapters.FSDPStrategyAdapter"
                },
                "allow_untested": True,
            },
            "custom_strategy_adapters.IAmMissing: unknown strategy 'IAmMissing' (mapped to "
            "'fms_acceleration_adapters.FSDPStrategyAdapter')",
        ),
        # FTS refuses a mapping that lacks the running strategy; here it falls back (README)
        (
            {
                "custom_strategy_adapters": {
                    "ddp": "fms_acceleration_adapters.FSDPStrategyAdapter"
                },
                "allow_untested": True,
            },
            "StrategyAdapter",
        ),
    ],
    ids=[
        "allow_untested",
        "disallow_untested",
        "found",
        "not_importable",
        "not_found",
        "other_strategy_mapped",
    ],
)
def test_strategy_adapter_selection(tmp_path, options, outcome):
    """FTS test_fts_distributed_compat, with accelerate's XLA as the untested strategy."""
    config = {
        "plugins": {
            "training": {"finetuning_schedule": {**options, "ft_schedule": implicit_schedule()}}
        }
    }
    if outcome.startswith("custom_strategy_adapters"):
        with pytest.raises(AccelerationPluginConfigError) as err:
            build_framework(config, [FinetuningSchedulePlugin])
        assert f": plugins.training.finetuning_schedule.{outcome}" in str(err.value)
        return
    framework = build_framework(config, [FinetuningSchedulePlugin])
    model = BoringModel()
    framework.augmentation(model, TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), ())
    if outcome.startswith("has not"):
        with pytest.raises(AccelerationPluginConfigError, match=outcome):
            framework.get_callbacks_and_ready_for_train(model, _Accelerator("XLA"))
        return
    framework.get_callbacks_and_ready_for_train(model, _Accelerator("XLA"))
    assert type(framework.plugins["finetuning_schedule"].adapter).__name__ == outcome


# ------------------------------------------------------------------- test_fts_invalid_schedules
START = {0: {"params": ["model.2.bias", "model.2.weight"]}}
END = {2: {"params": ["model.0.bias", "model.0.weight"]}}
P1 = {"params": ["model.1.bias", "model.1.weight"]}
STEP1 = {"lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1}}}
PATH = "plugins.training.finetuning_schedule.ft_schedule"
INVALID = {
    "missing_param": (
        {**START, 1: {"params": ["model.1.bias", "model.missing.weight"]}, **END},
        "phase 1: params entry 'model.missing.weight' matches no parameter of the model (did "
        "you mean 'model.3.weight'?)",
    ),
    "non_disjoint": (
        {**START, 1: {"params": ["model.1.bias", "model.2.weight"]}, **END},
        "parameter 'model.2.weight' is scheduled in phase 0 and in phase 1 (entry "
        "'model.2.weight'): each parameter may be thawed by one phase only",
    ),
    "invalid_lr": (
        {**START, 1: {**P1, "lr": "not_a_number"}, **END},
        "phase 1.lr: 'not_a_number' is not a number.",
    ),
    "unsupp_rlrs": (
        {
            **START,
            1: {
                **P1,
                "new_lr_scheduler": {
                    "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.CyclicLR"}
                },
            },
        },
        "phase 1.new_lr_scheduler.lr_scheduler_init.class_path: CyclicLR is not a supported LR "
        "scheduler (new param groups cannot join it); use one of LambdaLR, MultiplicativeLR, "
        "StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, ReduceLROnPlateau, "
        "CosineAnnealingWarmRestarts, ConstantLR, LinearLR, PolynomialLR (or a subclass), or "
        "set allow_untested: true to try it anyway",
    ),
    "invalid_plrs": (
        {
            **START,
            1: {**P1, "new_lr_scheduler": {**STEP1, "pl_lrs_cfg": {"interval": "throwerror"}}},
        },
        "phase 1.new_lr_scheduler.pl_lrs_cfg.interval: 'throwerror' is not an allowed value; "
        "allowed: 'epoch', 'step'.",
    ),
    "missing_lrs_init": (
        {**START, 1: {**P1, "new_lr_scheduler": {"pl_lrs_cfg": {"name": "otherwise_okay"}}}},
        "phase 1.new_lr_scheduler.lr_scheduler_init: required key is missing.",
    ),
    "no_cpath": (
        {
            **START,
            1: {**P1, "new_lr_scheduler": {"lr_scheduler_init": {"init_args": {"step_size": 1}}}},
        },
        "phase 1.new_lr_scheduler.lr_scheduler_init.class_path: required key is missing.",
    ),
    "newlr_in0": (
        {0: {**START[0], "new_lr_scheduler": STEP1}},
        "phase 0: new_lr_scheduler is a reinitialization directive for the initial phase, which "
        "is not allowed: the Trainer builds the initial optimizer and LR scheduler; "
        "reinitialization applies to phases >= 1 only",
    ),
    "nonfl_lr_init": (
        {**START, 1: {**P1, "new_lr_scheduler": {**STEP1, "init_pg_lrs": [2.0e-06, "whoops"]}}},
        "phase 1.new_lr_scheduler.init_pg_lrs[1]: 'whoops' is not a number.",
    ),
    "imp_lrs_fail": (
        {
            **START,
            1: {
                **P1,
                "new_lr_scheduler": {
                    "lr_scheduler_init": {
                        "class_path": "torch.optim.lr_scheduler.StepLRWhoops",
                        "init_args": {"step_size": 1},
                    }
                },
            },
        },
        "phase 1.new_lr_scheduler.lr_scheduler_init.class_path: module "
        "'torch.optim.lr_scheduler' has no attribute 'StepLRWhoops' (did you mean 'StepLR'?) "
        "(class_path 'torch.optim.lr_scheduler.StepLRWhoops')",
    ),
    "lrs_init_fail": (
        {
            **START,
            1: {
                **P1,
                "new_lr_scheduler": {
                    "lr_scheduler_init": {**STEP_07, "init_args": {"step_size": 1, "whoops": 0}}
                },
            },
        },
        "phase 1.new_lr_scheduler.lr_scheduler_init.init_args: StepLR(optimizer, **{'step_size': "
        "1, 'whoops': 0}) fails: TypeError: StepLR.__init__() got an unexpected keyword argument "
        "'whoops'",
    ),
    "optim_init_fail": (
        {
            **START,
            1: {
                **P1,
                "new_optimizer": {
                    "optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"whoops": 0}}
                },
            },
        },
        "phase 1.new_optimizer.optimizer_init.init_args: Adam(params, **{'whoops': 0}) fails: "
        "TypeError: Adam.__init__() got an unexpected keyword argument 'whoops'",
    ),
    "unsupported_optim_reinit": (
        {
            **START,
            1: {
                **P1,
                "new_optimizer": {
                    "optimizer_init": {
                        "class_path": "torch.distributed.optim.ZeroRedundancyOptimizer",
                        "init_args": {"optimizer_class": "torch.optim.AdamW"},
                    }
                },
            },
        },
        "phase 1.new_optimizer.optimizer_init.class_path: ZeroRedundancyOptimizer is not "
        "supported in the context of optimizer reinitialization (it shards its parameter "
        "groups); use a torch.optim optimizer",
    ),
    "extra_plrs_key": (
        {**START, 1: {**P1, "new_lr_scheduler": {**STEP1, "pl_lrs_cfg": {"whoops": "warnme"}}}},
        "phase 1.new_lr_scheduler.pl_lrs_cfg.whoops: unknown key 'whoops'; allowed keys: "
        "frequency, interval, monitor, name, reduce_on_plateau, strict.",
    ),
    "rlrop_missing_mon": (
        {
            **START,
            1: {
                **P1,
                "new_lr_scheduler": {
                    "lr_scheduler_init": {
                        "class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                        "init_args": {"patience": 2},
                    },
                    "pl_lrs_cfg": {"name": "x", "interval": "epoch"},
                },
            },
        },
        "phase 1.new_lr_scheduler.pl_lrs_cfg.monitor: the lr scheduler config must include a "
        "monitor when a ReduceLROnPlateau scheduler is used; set it to the metric to reduce on, "
        "the same as TrainingArguments.metric_for_best_model (the Trainer steps "
        "ReduceLROnPlateau with that metric)",
    ),
    "non_integer": (
        {**START, 1.1: P1, **END},
        "phase key 1.1 is not an integer: phases are keyed 0, 1, 2, ... (strings of digits such "
        "as '1' are read as integers)",
    ),
    "non_conv_int": (
        {**START, "b": P1, **END},
        "phase key 'b' is not an integer: phases are keyed 0, 1, 2, ... (strings of digits such "
        "as '1' are read as integers)",
    ),
    "non_contiguous": (
        {**START, **END},
        "phase keys must be contiguous integers starting at 0, got [0, 2]: phase 1 is missing; "
        "renumbered in order (2 -> 1) the schedule would be valid",
    ),
}


def schedule_file(tmp_path, name: str, schedule: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(schedule, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("key", list(INVALID))
def test_invalid_schedules(tmp_path, key):
    """FTS test_fts_invalid_schedules: every case FTS refuses (or, for non_integer and
    extra_plrs_key, warns about: refused here, see README) is refused when the framework is
    built (at augmentation where parameter names are needed), naming the file and entry.
    (lr_phase0, which FTS accepts with a warning, is in test_fts_parity_runs.)"""
    schedule, message = INVALID[key]
    path = schedule_file(tmp_path, key, schedule)
    stanza = {"ft_schedule": path, "log_dir": str(tmp_path / "logs")}
    config = {"plugins": {"training": {"finetuning_schedule": stanza}}}
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework = build_framework(config, [FinetuningSchedulePlugin])
        # parameter names need the model
        framework.augmentation(BoringModel(), TrainingArguments(str(tmp_path), report_to=[]), ())
    expected = f"{PATH}: {path}: {message}"
    if key == "non_contiguous":
        expected += f"; the renumbered schedule is in {tmp_path}/logs/non_contiguous_valid.yaml"
        renumbered = yaml.safe_load((tmp_path / "logs" / "non_contiguous_valid.yaml").read_text())
        assert renumbered[1]["params"][0] == "model.0.bias"  # FTS's check of its _valid file
    assert str(err.value).endswith(expected), str(err.value)


def test_invalid_schedule_duplicate_key(tmp_path):
    """FTS test_fts_invalid_schedules[dup_key]."""
    path = tmp_path / "dup_key.yaml"
    path.write_text("0:\n  params:\n  - model.2.bias\n0:\n  params:\n  - model.1.bias\n")
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(
            {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": str(path)}}}},
            [FinetuningSchedulePlugin],
        )
    assert str(err.value).endswith(
        f"{PATH}: {path}: duplicate key '0' at line 4 (first defined at line 1)."
    )


def test_invalid_schedule_conflicting_reinit():
    """FTS test_fts_invalid_schedules[cflict_reinit]: ft_schedule with reinit_lr_cfg."""
    stanza = {"ft_schedule": implicit_schedule(), "reinit_lr_cfg": {"lr_scheduler_init": STEP_07}}
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(
            {"plugins": {"training": {"finetuning_schedule": stanza}}}, [FinetuningSchedulePlugin]
        )
    assert str(err.value).endswith(
        "plugins.training.finetuning_schedule: ft_schedule and reinit_lr_cfg cannot be combined: "
        "reinit_lr_cfg rebuilds one LR scheduler config at every phase of the implicit "
        "(generated) schedule; with an explicit schedule, put new_lr_scheduler in its phases "
        "instead"
    )


def test_accepted_schedules_with_a_warning(tmp_path, caplog):
    """FTS test_fts_invalid_schedules[valid_nonint, ext_opt_key, num_pg_w]: string phase keys
    are read as integers (and the valid copy written), an `optimizer` init arg is dropped,
    init_pg_lrs covering every group is used."""
    sched = {
        "0": {"params": ["model.3.bias", "model.3.weight"], "max_transition_epoch": 1},
        "1": {
            "params": ["model.2.bias", "model.2.weight"],
            "new_lr_scheduler": {
                "lr_scheduler_init": {
                    **STEP_07,
                    "init_args": {"step_size": 1, "optimizer": "whoops"},
                },
                "init_pg_lrs": [2.0e-06, 2.0e-06],
            },
        },
    }
    with caplog.at_level(logging.INFO, logger=LOG):
        _, plugin, rec = run_boring(
            str(tmp_path), fts(ft_schedule=sched, max_depth=1), [1.0, 0.5], epochs=2
        )
    assert "phase keys '0', '1' were read as integers" in caplog.text
    assert "init_args has an `optimizer` key; it is dropped" in caplog.text
    assert rec.lrs[1] == (2e-06, 2e-06)
    valid = yaml.safe_load((tmp_path / "BoringModel_ft_schedule_valid.yaml").read_text())
    assert sorted(valid) == [0, 1]
    assert plugin.callback.state.written["BoringModel_ft_schedule.yaml"] == str(
        tmp_path / "BoringModel_ft_schedule.yaml"
    )


def test_init_pg_lrs_longer_than_the_groups_is_refused_before_step_0(tmp_path):
    """FTS only warns to count init_pg_lrs by hand; the groups are known here before step 0."""
    sched = implicit_schedule()
    sched[1]["new_lr_scheduler"] = {**STEP1, "init_pg_lrs": [1e-6, 1e-6, 1e-6]}
    with pytest.raises(FTSTransitionError) as err:
        run_boring(str(tmp_path), fts(ft_schedule=sched), DIVERGE_AT_4, epochs=1)
    assert str(err.value) == (
        "phase 1.new_lr_scheduler.init_pg_lrs has 3 lrs but the optimizer has 2 param groups at "
        "phase 1 (groups by phase: 0: 1, 1: 1)"
    )


# ------------------------------------------------------------------- test_fts_misconfiguration
@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"ft_schedule": "/tmp/fnf_schedule.yaml"},
            f"{PATH}: /tmp/fnf_schedule.yaml: ft_schedule file does not exist.",
        ),
        (
            {"reinit_lr_cfg": {"lr_scheduler_init": STEP_07, "init_pg_lrs": [2e-6, 2e-6]}},
            "plugins.training.finetuning_schedule.reinit_lr_cfg.init_pg_lrs: not allowed in "
            "reinit_lr_cfg (implicit mode): the same lr scheduler config is rebuilt at every "
            "phase, so one list of per-group lrs cannot fit them all",
        ),
        (
            {"reinit_lr_cfg": rlrop(1, [0, 0])},
            "plugins.training.finetuning_schedule.reinit_lr_cfg.lr_scheduler_init.init_args."
            "min_lr: cannot be a list or tuple in reinit_lr_cfg (implicit mode): the same lr "
            "scheduler config is rebuilt at every phase, with a different number of param "
            "groups each time",
        ),
    ],
    ids=["schedfnf", "imp_reinit_pg", "imp_reinit_rlrop_mlr"],
)
def test_misconfiguration(options, message):
    """FTS test_fts_misconfiguration (the cases with a Trainer counterpart)."""
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(
            {"plugins": {"training": {"finetuning_schedule": options}}}, [FinetuningSchedulePlugin]
        )
    assert str(err.value).endswith(message), str(err.value)


def test_restore_best_without_checkpoints(tmp_path):
    """FTS test_fts_misconfiguration[topk0]: restore_best needs checkpoints to restore."""
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"restore_best": True}}}},
        [FinetuningSchedulePlugin],
    )
    args = TrainingArguments(str(tmp_path), eval_strategy="epoch", save_strategy="no")
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework.augmentation(BoringModel(), args, ())
    assert str(err.value) == (
        "plugins.training.finetuning_schedule.restore_best: true needs a checkpoint of the best "
        "evaluation to restore, but TrainingArguments has eval_strategy='epoch' and "
        "save_strategy='no': evaluate and save on the same cadence, or set restore_best: false"
    )


def test_tied_alias_in_schedule_is_dropped(tmp_path, caplog):
    """FTS prunes an explicitly scheduled shared parameter with a warning."""
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_model_config("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                          tie_word_embeddings=True)
    )  # fmt: skip
    sched = {
        0: {"params": ["lm_head.weight", "model.norm.weight"]},
        1: {"params": ["model.embed_tokens.weight"]},
    }
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": sched}}}},
        [FinetuningSchedulePlugin],
    )
    with caplog.at_level(logging.WARNING):
        framework.augmentation(model, TrainingArguments(str(tmp_path), report_to=[]), ())
    cb = framework.plugins["finetuning_schedule"].callback
    assert [p.params for p in cb.phases] == [("model.norm.weight",), ("model.embed_tokens.weight",)]
    assert "phase 0: 'lm_head.weight' is a tied (shared) parameter; it is dropped from the " in (
        caplog.text
    )

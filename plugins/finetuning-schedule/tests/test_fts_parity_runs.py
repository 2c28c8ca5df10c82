"""Parity with Fine-Tuning Scheduler, second pass: expected values recorded from FTS itself.

Each table below was produced by running finetuning-scheduler 2.14.1 (lightning 2.6.6, torch
2.13) on FTS's own test model and fixtures (tests/test_finetuning_scheduler_callback.py:
FinetuningSchedulerBoringModel, SGD lr 1e-3 + StepLR(gamma 0.7) per epoch, the generated
4-phase schedule, FTSEarlyStopping on val_loss) and printing, at each epoch start, the depth,
the param groups and their lr / initial_lr. FTS's val_loss improves through epoch 3 and is
worse from epoch 4 on in every run here, which DIVERGE_AT_4 replays; `restore_best` was off
where FTS's optimizer reinitialization cannot restore a checkpoint of another optimizer class.
The default-schedule layouts come from FTS's ScheduleImplMixin._gen_ft_schedule_impl on the
same tiny transformers models. Deliberate differences are named where a test meets one (and
listed in the README).
"""

from __future__ import annotations

import logging

import pytest
import torch
from fts_parity_models import EXPLICIT, implicit_schedule, run_boring
from transformers import AutoModelForCausalLM, TrainingArguments

from fms_acceleration.testing import build_framework, tiny_model_config
from fms_acceleration_fts import FinetuningSchedulePlugin

LOG = "fms_acceleration_fts"
DIVERGE_AT_4 = [4.0, 3.0, 2.0, 1.0] + [5.0 + i for i in range(40)]
STEPLR_07 = {0: (0.001,), 1: (0.0007,), 2: (0.00049,), 3: (0.000343,), 4: (0.0002401,)}
PL_EPOCH = {"interval": "epoch", "frequency": 1}


def fts(patience: int = 1, **options):
    """FTS without no_decay (one group per phase), early stopping patience, plus options."""
    return {"no_decay": [], "early_stopping": {"patience": patience}, **options}


def step_lr(gamma: float, **extra) -> dict:
    return {
        "lr_scheduler_init": {
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 1, "gamma": gamma},
        },
        "pl_lrs_cfg": PL_EPOCH,
        **extra,
    }


def cosine(**extra) -> dict:
    return {
        "lr_scheduler_init": {
            "class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
            "init_args": {"T_0": 2, "eta_min": 1e-7},
        },
        "pl_lrs_cfg": PL_EPOCH,
        **extra,
    }


def close(got: dict[int, tuple], want: dict[int, tuple]) -> None:
    assert set(got) >= set(want), (sorted(got), sorted(want))
    for epoch, lrs in want.items():
        assert got[epoch] == pytest.approx(lrs, rel=2e-4, abs=1e-12), (epoch, got[epoch], lrs)


# ------------------------------------------------- LR-scheduler reinitialization: starting lrs
def partial_init_pg(use_current: bool) -> dict:
    """Phase 2 sets init_pg_lrs for its first group only (of three)."""
    sched = implicit_schedule()
    sched[1]["new_lr_scheduler"] = step_lr(0.7)
    if use_current:
        sched[2]["new_lr_scheduler"] = step_lr(
            0.5, init_pg_lrs=[1e-6], use_current_optimizer_pg_lrs=True
        )
        sched[3]["new_lr_scheduler"] = step_lr(0.5, use_current_optimizer_pg_lrs=True)
    else:
        sched[2]["lr"] = 3e-6
        sched[2]["new_lr_scheduler"] = step_lr(0.5, init_pg_lrs=[1e-6])
        sched[3]["new_lr_scheduler"] = step_lr(0.5)
    return sched


def cosine_restarts(use_current: bool) -> dict:
    sched = implicit_schedule()
    sched[1]["new_lr_scheduler"] = cosine(use_current_optimizer_pg_lrs=use_current)
    sched[2]["lr"] = 3e-6
    sched[2]["new_lr_scheduler"] = cosine(use_current_optimizer_pg_lrs=use_current)
    return sched


COSINE = (
    {5: (0.001, 1e-05), 6: (0.001, 1e-05, 3e-06), 7: (0.00050005, 5.05e-06, 1.55e-06, 1e-05)},
    {5: (0.001, 1e-05), 6: (0.001, 1e-05, 3e-06), 7: (0.001, 1e-05, 3e-06, 1e-05)},
)
# case: (schedule, FTS's lrs from epoch 5, FTS's initial_lrs from epoch 5); patience 1,
# transitions at epochs 5, 6, 7
LR_REINIT = {
    # the groups init_pg_lrs does not reach keep their current lr (7e-6, not their 1e-5)
    "init_pg_lrs_partial": (
        partial_init_pg(False),
        {5: (0.001, 1e-05), 6: (1e-06, 7e-06, 3e-06), 7: (1e-06, 1e-05, 3e-06, 1e-05)},
        {6: (1e-06, 1e-05, 3e-06), 7: (1e-06, 1e-05, 3e-06, 1e-05)},
    ),
    # init_pg_lrs wins over use_current_optimizer_pg_lrs; the others keep their current lr
    "init_pg_lrs_partial_use_current": (
        partial_init_pg(True),
        {5: (0.001, 1e-05), 6: (1e-06, 7e-06, 1e-05), 7: (5e-07, 3.5e-06, 5e-06, 1e-05)},
        {6: (1e-06, 1e-05, 1e-05), 7: (1e-06, 1e-05, 1e-05, 1e-05)},
    ),
    # CosineAnnealingWarmRestarts computes its first lr from initial_lr, so
    # use_current_optimizer_pg_lrs makes no difference to it (in FTS as here)
    "cosine_default": (cosine_restarts(False), *COSINE),
    "cosine_use_current": (cosine_restarts(True), *COSINE),
}


@pytest.mark.parametrize("case", list(LR_REINIT))
def test_lr_scheduler_reinit_starting_lrs(tmp_path, case):
    """LR-scheduler reinitialization with the default, use_current_optimizer_pg_lrs and a partial
    init_pg_lrs: lr and initial_lr of every group, epoch by epoch, as FTS has them."""
    sched, lrs, initial = LR_REINIT[case]
    _, plugin, rec = run_boring(str(tmp_path), fts(ft_schedule=sched), DIVERGE_AT_4, epochs=20)
    assert plugin.callback.depth == 3 and sorted(rec.lrs) == list(range(8))
    close(rec.lrs, {**STEPLR_07, **lrs})
    close(rec.initial_lrs, initial)


# ------------------------------------------------------- optimizer reinitialization with its lr
def optimizer_reinit(case: str) -> dict:
    sched = implicit_schedule()
    if case == "class_default_lr":  # Adam without lr: its default 1e-3 is phase 0's initial_lr
        sched[1]["new_optimizer"] = {
            "optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {}}
        }
        sched[2]["new_lr_scheduler"] = step_lr(0.5)
        return sched
    sched[1]["new_lr_scheduler"] = step_lr(0.7)
    if case == "with_partial_init_pg_lrs":
        sched[2]["new_optimizer"] = {
            "optimizer_init": {
                "class_path": "torch.optim.SGD",
                "init_args": {"lr": 2e-3, "momentum": 0.9},
            }
        }
        sched[2]["new_lr_scheduler"] = step_lr(0.5, init_pg_lrs=[5e-4])
    else:
        sched[2]["new_optimizer"] = {
            "optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"lr": 4e-4}}
        }
        sched[2]["new_lr_scheduler"] = step_lr(0.5, use_current_optimizer_pg_lrs=True)
    return sched


STEPLR_07_TO_5 = {**STEPLR_07, 5: (0.00016807,)}
# case: (optimizer class per epoch from 6, FTS's lrs from epoch 6, FTS's initial_lrs at 8);
# patience 2, transitions at epochs 6, 8, 10
OPTIMIZER_REINIT = {
    "class_default_lr": (
        "Adam",
        {
            6: (0.000117649, 1e-05),
            7: (8.2354e-05, 7e-06),
            8: (0.001, 1e-05, 1e-05),
            9: (0.0005, 5e-06, 5e-06),
            10: (0.00025, 2.5e-06, 2.5e-06, 1e-05),
            11: (0.000125, 1.25e-06, 1.25e-06, 5e-06),
        },
        (0.001, 1e-05, 1e-05),
    ),
    # the rebuilt phase-0 group takes init_pg_lrs, not the new optimizer's 2e-3; phase 1's group
    # keeps its current lr
    "with_partial_init_pg_lrs": (
        "SGD",
        {
            6: (0.001, 1e-05),
            7: (0.0007, 7e-06),
            8: (0.0005, 4.9e-06, 1e-05),
            9: (0.00025, 2.45e-06, 5e-06),
            10: (0.000125, 1.225e-06, 2.5e-06, 1e-05),
            11: (6.25e-05, 6.12e-07, 1.25e-06, 5e-06),
        },
        (0.0005, 1e-05, 1e-05),
    ),
    # the rebuilt groups keep their current lrs (use_current_optimizer_pg_lrs); phase 0's
    # initial_lr is the new optimizer's lr
    "use_current": (
        "Adam",
        {
            6: (0.001, 1e-05),
            7: (0.0007, 7e-06),
            8: (0.00049, 4.9e-06, 1e-05),
            9: (0.000245, 2.45e-06, 5e-06),
            10: (0.0001225, 1.225e-06, 2.5e-06, 1e-05),
            11: (6.125e-05, 6.12e-07, 1.25e-06, 5e-06),
        },
        (0.0004, 1e-05, 1e-05),
    ),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_REINIT))
def test_optimizer_reinit_with_its_own_lr(tmp_path, case):
    """A new optimizer with (or without) its own lr, then an LR-scheduler reinitialization."""
    cls, lrs, initial_at_8 = OPTIMIZER_REINIT[case]
    stanza = fts(patience=2, ft_schedule=optimizer_reinit(case))
    _, plugin, rec = run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=20)
    assert plugin.callback.depth == 3 and sorted(rec.lrs) == list(range(12))
    first_new = 6 if case == "class_default_lr" else 8
    assert [rec.rows[e][5] for e in range(12)] == ["SGD"] * first_new + [cls] * (12 - first_new)
    close(rec.lrs, {**STEPLR_07_TO_5, **lrs})
    close({8: rec.initial_lrs[8]}, {8: initial_at_8})


# ------------------------------------------------------------------ max_epochs is extended
def epoch_schedule(epochs: tuple[int, int, int | None]) -> dict:
    """FTS's explicit test schedule with these max_transition_epochs (None: left out)."""
    sched = {k: {**v, "params": list(v["params"])} for k, v in EXPLICIT.items()}
    del sched[1]["lr"]
    for depth, limit in enumerate(epochs):
        if limit is not None:
            sched[depth]["max_transition_epoch"] = limit
    return sched


# case: (max_transition_epochs, options, num_train_epochs, FTS's depth at each epoch, FTS's
# max_epochs after setup, FTS's lrs)
EXTEND = {
    "epoch_transitions_only": (
        (2, 4, 6),
        {"epoch_transitions_only": True},
        3,
        [0, 0, 1, 1, 2, 2],
        6,
        {
            2: (0.00049, 1e-05),
            4: (0.0002401, 4.9e-06, 1e-05),
            5: (0.00016807, 3.43e-06, 7e-06),
        },
    ),
    # early stopping ends the final phase at epoch 6, before the extended 9 epochs
    "early_stopping": (
        (1, 2, 9),
        {"early_stopping": {"patience": 3}},
        4,
        [0, 1, 2, 2, 2, 2, 2],
        9,
        {1: (0.0007, 1e-05), 6: (0.000117649, 1.681e-06, 2.401e-06)},
    ),
    # only a limit on the final phase extends the run; phase 1's 6 does not
    "final_phase_without_limit": (
        (1, 6, None),
        {"early_stopping": {"patience": 3}},
        4,
        [0, 1, 1, 1],
        4,
        {3: (0.000343, 4.9e-06)},
    ),
    # the schedule's last phase counts even when max_depth stops the run before it
    "max_depth_before_the_last_phase": (
        (2, 4, 6),
        {"epoch_transitions_only": True, "max_depth": 1},
        3,
        [0, 0, 1, 1, 1, 1],
        6,
        {5: (0.00016807, 3.43e-06)},
    ),
}


@pytest.mark.parametrize("case", list(EXTEND))
def test_max_epochs_extended_to_the_schedules_epochs(tmp_path, case, caplog):
    """FTS raises max_epochs to the largest max_transition_epoch of phases >= 1 when the final
    phase has one; here num_train_epochs is raised at augmentation, before the Trainer fixes
    the run's length from it."""
    limits, options, epochs, depths, extended, lrs = EXTEND[case]
    stanza = {"no_decay": [], **options, "ft_schedule": epoch_schedule(limits)}
    with caplog.at_level(logging.WARNING, logger=LOG):
        trainer, _, rec = run_boring(str(tmp_path), stanza, DIVERGE_AT_4, epochs=epochs)
    assert trainer.args.num_train_epochs == extended
    assert [rec.rows[e][0] for e in sorted(rec.rows)] == depths
    close(rec.lrs, lrs)
    noted = "the run lasts the greater of num_train_epochs" in caplog.text
    assert noted == (limits[-1] is not None)


# ----------------------------------------------------------- resume with implicit early stopping
def test_resume_keeps_early_stoppings_wait_count(tmp_path):
    """Resuming mid-phase from a checkpoint saved one bad evaluation into phase 1 (FTS's
    FTSEarlyStopping state there: wait_count 1, best 0.0282 from epoch 3): the count carries over,
    so the next bad evaluation moves to phase 2 at epoch 8, as in the uninterrupted run.

    FTS 2.14.1 restores wait_count 1 too and transitions at epoch 8, but its resumed run labels
    that phase 1 and keeps two param groups until epoch 10 (its checkpoint metadata says depth
    0): here the resumed run is the uninterrupted one (README)."""
    args = {"save_strategy": "epoch", "save_total_limit": None}
    stanza = fts(patience=2)
    _, _, full = run_boring(str(tmp_path / "full"), stanza, DIVERGE_AT_4, epochs=20, **args)
    assert [full.rows[e][0] for e in range(12)] == [0] * 6 + [1, 1, 2, 2, 3, 3]
    assert [full.waits[e] for e in range(5, 12)] == [1, 0, 1, 0, 1, 0, 1]
    ckpt = str(tmp_path / "full" / "checkpoint-7")  # end of epoch 6: phase 1, wait 1
    _, plugin, resumed = run_boring(
        str(tmp_path / "resumed"), stanza, DIVERGE_AT_4[7:], epochs=20, resume=ckpt, **args
    )
    assert sorted(resumed.rows) == list(range(7, 12))
    assert resumed.waits[7] == 1
    assert {e: resumed.rows[e][:5] for e in resumed.rows} == {
        e: full.rows[e][:5] for e in range(7, 12)
    }
    close(resumed.lrs, {e: full.lrs[e] for e in range(7, 12)})
    assert [t["global_step"] for t in plugin.callback.state.transitions] == [6, 8, 10]


# ----------------------------------------------------------------------------- phase-0 lr
def test_phase0_lr_is_accepted_and_unused(tmp_path, caplog):
    """FTS test_fts_invalid_schedules[lr_phase0] warns and drops it (FTS run: phase 0 trains at
    the optimizer's 1e-3, phase 1 joins at epoch 5 at 1e-5)."""
    sched = implicit_schedule()
    sched[0]["lr"] = 5e-4
    with caplog.at_level(logging.WARNING, logger=LOG):
        trainer, plugin, rec = run_boring(
            str(tmp_path), fts(ft_schedule=sched, max_depth=1), DIVERGE_AT_4, epochs=20
        )
    assert "phase 0: lr 0.0005 is not used" in caplog.text
    assert round(trainer.state.epoch) == 6 and plugin.callback.depth == 1
    close(rec.lrs, {**STEPLR_07, 5: (0.00016807, 1e-05)})


# ---------------------------------------------------------------- generated default schedules
# FTS's generated schedule for tiny transformers models: (phases, tensors per phase, phase 0,
# phase 1, last phase). Tied embeddings: lm_head.weight is the embedding, named once.
LAYOUTS = {
    "llama_1_layer": (
        ("llama", {"num_hidden_layers": 1}),
        "222222",
        ["lm_head.weight", "model.norm.weight"],
        ["model.layers.0.post_attention_layernorm.weight", "model.layers.0.input_layernorm.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
    ),
    "llama_3_layers": (
        ("llama", {"num_hidden_layers": 3}),
        "2" * 15,
        ["lm_head.weight", "model.norm.weight"],
        ["model.layers.2.post_attention_layernorm.weight", "model.layers.2.input_layernorm.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
    ),
    "llama_3_layers_tied": (
        ("llama", {"num_hidden_layers": 3, "tie_word_embeddings": True}),
        "2" * 14 + "1",
        ["model.norm.weight", "model.layers.2.post_attention_layernorm.weight"],
        ["model.layers.2.input_layernorm.weight", "model.layers.2.mlp.down_proj.weight"],
        ["model.embed_tokens.weight"],
    ),
    "llama_1_layer_tied": (
        ("llama", {"num_hidden_layers": 1, "tie_word_embeddings": True}),
        "222221",
        ["model.norm.weight", "model.layers.0.post_attention_layernorm.weight"],
        ["model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight"],
        ["model.embed_tokens.weight"],
    ),
    "qwen2_biases_1_layer": (
        ("qwen2", {"num_hidden_layers": 1}),
        "22222221",
        ["lm_head.weight", "model.norm.weight"],
        ["model.layers.0.post_attention_layernorm.weight", "model.layers.0.input_layernorm.weight"],
        ["model.embed_tokens.weight"],
    ),
    "qwen2_biases_2_layers_tied": (
        ("qwen2", {"num_hidden_layers": 2, "tie_word_embeddings": True}),
        "2" * 13,
        ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"],
        ["model.layers.1.input_layernorm.weight", "model.layers.1.mlp.down_proj.weight"],
        ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
    ),
    "llama_all_biases_2_layers": (
        ("llama", {"num_hidden_layers": 2, "attention_bias": True, "mlp_bias": True}),
        "2" * 17 + "1",
        ["lm_head.weight", "model.norm.weight"],
        ["model.layers.1.post_attention_layernorm.weight", "model.layers.1.input_layernorm.weight"],
        ["model.embed_tokens.weight"],
    ),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_generated_schedule_layout(tmp_path, case):
    """FTS test_fts_gen_ft_schedule on small and odd transformers models (one layer, odd layer
    counts, biases, tied embeddings): the schedule the plugin generates and writes."""
    (arch, overrides), sizes, phase0, phase1, last = LAYOUTS[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_model_config(arch, **overrides))
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"log_dir": str(tmp_path)}}}},
        [FinetuningSchedulePlugin],
    )
    framework.augmentation(model, TrainingArguments(str(tmp_path), report_to=[]), ())
    callback = framework.plugins["finetuning_schedule"].callback
    schedule = callback.files.schedule
    assert "".join(str(len(p["params"])) for p in schedule.values()) == sizes
    assert (schedule[0]["params"], schedule[1]["params"]) == (phase0, phase1)
    assert schedule[len(schedule) - 1]["params"] == last
    # every tensor of the model is in exactly one phase, in reverse model order
    names = [n for n, _ in model.named_parameters()]
    assert [n for p in schedule.values() for n in p["params"]] == names[::-1]
    assert list(callback.phases[0].params) == sorted(phase0, key=names.index)

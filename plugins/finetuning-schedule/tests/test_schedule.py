"""Schedule parsing and validation (pure module: names only, no model)."""

from __future__ import annotations

import re

import pytest

from fms_acceleration_fts.schedule import (
    FTSScheduleError,
    default_schedule,
    dump_schedule,
    final_depth,
    load_schedule_yaml,
    read_schedule,
    unscheduled_params,
    validate_schedule,
    write_schedule,
)

NAMES = [
    "model.embed.weight",
    "model.layers.0.attn.weight",
    "model.layers.0.attn.bias",
    "model.layers.1.attn.weight",
    "model.layers.1.attn.bias",
    "model.layers.10.attn.weight",
    "head.weight",
    "head.bias",
]


def test_valid_schedule_resolves_names_and_regexes_in_model_order():
    raw = {
        0: {"params": ["head.bias", "head.weight"], "max_transition_epoch": 2},
        1: {"params": [r"model\.layers\.1\.attn"], "lr": 1e-4, "max_transition_step": 30},
        2: {
            "params": ["model.layers.10.attn.weight", r"model\.layers\.0\."],
            "new_optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
            "new_lr_scheduler": {
                "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR"}
            },
        },
    }
    phases = validate_schedule(raw, NAMES)
    assert [p.depth for p in phases] == [0, 1, 2]
    assert phases[0].params == ("head.weight", "head.bias")
    assert phases[1].params == ("model.layers.1.attn.weight", "model.layers.1.attn.bias")
    # "model.layers.1." regex-escaped does not catch layers.10 (matched from the start)
    assert phases[2].params == (
        "model.layers.0.attn.weight",
        "model.layers.0.attn.bias",
        "model.layers.10.attn.weight",
    )
    assert (phases[0].max_transition_epoch, phases[0].max_transition_step) == (2, -1)
    assert (phases[1].lr, phases[1].max_transition_step) == (1e-4, 30)
    assert phases[2].new_optimizer.class_path == "torch.optim.SGD"
    assert phases[2].new_optimizer.init_args == {"lr": 0.1}
    assert phases[2].new_lr_scheduler.class_path == "torch.optim.lr_scheduler.StepLR"
    assert unscheduled_params(phases, NAMES) == ["model.embed.weight"]
    assert final_depth(phases, -1) == 2 and final_depth(phases, 1) == 1
    assert final_depth(phases, 7) == 2


def ok(**extra):
    """Phase 0 valid for NAMES, plus extra keys."""
    return {"params": ["head.weight"], **extra}


OPT = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}

# (raw schedule, options, expected message regex)
INVALID = [
    pytest.param({"a": ok()}, {}, r"phase key 'a' is not an integer", id="non-int-key"),
    pytest.param({"0": ok()}, {}, r"phase key '0' is not an integer", id="string-key"),
    pytest.param(
        {0: ok(), 2: {"params": ["head.bias"]}},
        {},
        r"contiguous integers starting at 0, got \[0, 2\]: phase 1 is missing",
        id="gap",
    ),
    pytest.param({1: ok()}, {}, r"starting at 0, got \[1\]: phase 0 is missing", id="no-phase-0"),
    pytest.param(
        {0: ok(), 1: {"params": ["head.wieght"]}},
        {},
        r"phase 1: params entry 'head.wieght' matches no parameter of the model "
        r"\(did you mean 'head.weight'\?\)",
        id="unknown-name",
    ),
    pytest.param(
        {0: {"params": [r"decoder\..*"]}},
        {},
        r"phase 0: params entry 'decoder\\\\\.\.\*' matches no parameter",
        id="regex-matches-nothing",
    ),
    pytest.param(
        {0: {"params": ["model.layers.(0"]}},
        {},
        r"phase 0: params entry 'model.layers.\(0' is neither a parameter name nor a valid regex",
        id="bad-regex",
    ),
    pytest.param(
        {0: {"params": [r"model\.layers\.1"]}, 1: {"params": ["model.layers.1.attn.bias"]}},
        {},
        r"parameter 'model.layers.1.attn.bias' is scheduled in phase 0 and in phase 1 "
        r"\(entry 'model.layers.1.attn.bias'\)",
        id="param-in-two-phases",
    ),
    pytest.param(
        {0: {"params": ["head.bias", r"head\."]}},
        {},
        r"parameter 'head.bias' is scheduled twice in phase 0",
        id="param-twice-in-one-phase",
    ),
    pytest.param({0: {"params": []}}, {}, r"phase 0: params must be a non-empty list", id="empty"),
    pytest.param({0: {"max_transition_epoch": 1}}, {}, r"phase 0: params must be", id="no-params"),
    pytest.param({0: {"params": [3]}}, {}, r"phase 0: params entry 3 is not a string", id="int"),
    pytest.param(
        {0: ok(max_transiton_epoch=2)},
        {},
        r"phase 0: unknown key 'max_transiton_epoch' \(did you mean 'max_transition_epoch'\?\)",
        id="typo-key",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=1.5)},
        {},
        r"phase 0: max_transition_epoch must be an integer >= 0 \(or -1 for no limit\), got 1.5",
        id="float-epoch",
    ),
    pytest.param(
        {0: ok(max_transition_step=-3)},
        {},
        r"phase 0: max_transition_step must be an integer >= 0",
        id="negative-step",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=3), 1: {"params": ["head.bias"], "max_transition_epoch": 2}},
        {},
        r"phase 1: max_transition_epoch 2 is smaller than phase 0's \(3\)",
        id="decreasing-epochs",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"], "lr": "fast"}},
        {},
        r"phase 1: lr must be a positive float, got 'fast'",
        id="non-float-lr",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"], "lr": True}},
        {},
        r"phase 1: lr must be a positive float, got True",
        id="bool-lr",
    ),
    pytest.param(
        {0: ok(lr=1e-3)}, {}, r"phase 0: lr is taken from the Trainer", id="lr-in-phase-0"
    ),
    pytest.param(
        {0: ok(new_optimizer=OPT)},
        {},
        r"phase 0: new_optimizer is not allowed: .* phases >= 1 only",
        id="reinit-optimizer-phase-0",
    ),
    pytest.param(
        {0: ok(new_lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR"})},
        {},
        r"phase 0: new_lr_scheduler is not allowed",
        id="reinit-scheduler-phase-0",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"], "new_optimizer": {"init_args": {"lr": 1.0}}}},
        {},
        r"phase 1: new_optimizer has no class_path",
        id="missing-class-path",
    ),
    pytest.param(
        {
            0: ok(),
            1: {
                "params": ["head.bias"],
                "new_lr_scheduler": {"lr_scheduler_init": {"init_args": {}}},
            },
        },
        {},
        r"phase 1: new_lr_scheduler.lr_scheduler_init has no class_path",
        id="missing-class-path-nested",
    ),
    pytest.param(
        {
            0: ok(),
            1: {"params": ["head.bias"], "new_optimizer": {"class_path": "torch.optim.Adamm"}},
        },
        {},
        r"phase 1: new_optimizer: module 'torch.optim' has no attribute 'Adamm'",
        id="unimportable-class",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"], "new_optimizer": {"class_path": "nopkg.Opt"}}},
        {},
        r"phase 1: new_optimizer: cannot import module 'nopkg'",
        id="unimportable-module",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"], "new_optimizer": {**OPT, "init_arg": {}}}},
        {},
        r"phase 1: new_optimizer has unknown key 'init_arg' \(did you mean 'init_args'\?\)",
        id="reinit-typo",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.bias"]}},
        {"epoch_transitions_only": True},
        r"phase 0: epoch_transitions_only is set, so every phase but the last needs "
        r"max_transition_epoch >= 0",
        id="epoch-only-missing-epoch",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=1, max_transition_step=5), 1: {"params": ["head.bias"]}},
        {"epoch_transitions_only": True},
        r"phase 0: max_transition_step is not allowed with epoch_transitions_only",
        id="epoch-only-step",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=3), 1: {"params": ["head.bias"], "max_transition_epoch": 2}},
        {},
        r"phase 1: max_transition_epoch 2 is smaller than phase 0's \(3\); transition epochs "
        r"must not decrease",
        id="decreasing-epochs",
    ),
    pytest.param(
        {0: ok(max_transition_step=9), 1: {"params": ["head.bias"], "max_transition_step": 4}},
        {},
        r"phase 1: max_transition_step 4 is smaller than phase 0's \(9\); transition steps "
        r"must not decrease",
        id="decreasing-steps",
    ),
    pytest.param({}, {}, r"must be a non-empty mapping", id="empty-schedule"),
    pytest.param([ok()], {}, r"must be a non-empty mapping", id="list-schedule"),
]


@pytest.mark.parametrize("raw,opts,message", INVALID)
def test_invalid_schedules_name_phase_and_entry(raw, opts, message):
    with pytest.raises(FTSScheduleError, match=message):
        validate_schedule(raw, NAMES, **opts)


def test_epoch_transitions_only_accepts_last_phase_without_epoch():
    raw = {0: ok(max_transition_epoch=1), 1: {"params": ["head.bias"]}}
    phases = validate_schedule(raw, NAMES, epoch_transitions_only=True)
    assert [p.max_transition_epoch for p in phases] == [1, -1]


def test_duplicate_yaml_keys_are_errors():
    text = "0:\n  params: [head.weight]\n1:\n  params: [head.bias]\n0:\n  params: [x]\n"
    with pytest.raises(
        FTSScheduleError, match=r"duplicate key 0 .*line 5; first defined on line 1"
    ):
        load_schedule_yaml(text)
    text = "0:\n  params: [head.weight]\n  lr: 1.0\n  lr: 2.0\n"
    with pytest.raises(FTSScheduleError, match=r"duplicate key 'lr' .*line 4"):
        load_schedule_yaml(text)


def test_yaml_reads_exponent_floats_and_round_trips(tmp_path):
    raw = load_schedule_yaml("0:\n  params: [head.weight]\n1:\n  params: [head.bias]\n  lr: 1e-5\n")
    assert raw[1]["lr"] == pytest.approx(1e-5) and isinstance(raw[1]["lr"], float)
    path = write_schedule(raw, tmp_path / "s.yaml")
    assert read_schedule(path) == raw
    assert validate_schedule(read_schedule(path), NAMES)[1].lr == pytest.approx(1e-5)


def test_read_schedule_errors(tmp_path):
    with pytest.raises(FTSScheduleError, match=r"ft_schedule file '.*missing.yaml' does not exist"):
        read_schedule(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(FTSScheduleError, match=r"is empty"):
        read_schedule(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("0: [unclosed\n")
    with pytest.raises(FTSScheduleError, match=r"not valid YAML"):
        read_schedule(tmp_path / "bad.yaml")


def test_default_schedule_is_reverse_order_two_per_phase():
    sched = default_schedule(NAMES)
    assert sched == {
        0: {"params": ["head.bias", "head.weight"]},
        1: {"params": ["model.layers.10.attn.weight", "model.layers.1.attn.bias"]},
        2: {"params": ["model.layers.1.attn.weight", "model.layers.0.attn.bias"]},
        3: {"params": ["model.layers.0.attn.weight", "model.embed.weight"]},
    }
    # exact names that look like regexes still resolve to themselves only
    phases = validate_schedule(load_schedule_yaml(dump_schedule(sched)), NAMES)
    assert [len(p.params) for p in phases] == [2, 2, 2, 2]
    assert unscheduled_params(phases, NAMES) == []
    assert re.match(r"model\.layers\.1", "model.layers.10")  # why exact names win over regexes


def test_shipped_example_schedule_and_stanza_are_valid():
    import os

    import yaml

    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = [
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")
    ] + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    phases = validate_schedule(read_schedule(os.path.join(here, "example_ft_schedule.yaml")), names)
    assert [len(p.params) for p in phases] == [2, 3, 4]
    assert phases[1].lr == pytest.approx(1e-4)
    with open(os.path.join(here, "finetuning_schedule.yaml")) as fh:
        stanza = yaml.safe_load(fh)["plugins"]["training"]["finetuning_schedule"]
    assert (
        stanza["base_max_lr"] == pytest.approx(1e-5) and stanza["early_stopping"]["patience"] == 3
    )

"""Schedule parsing and validation (pure module: names only, no model)."""

from __future__ import annotations

import logging
import re
import time

import pytest

from fms_acceleration_fts.schedule import (
    FTSScheduleError,
    default_schedule,
    dump_schedule,
    final_depth,
    load_schedule_yaml,
    parse_schedule,
    read_schedule,
    schedule_epochs,
    unscheduled_params,
    validate_schedule,
    write_new_file,
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
                "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR"},
                "pl_lrs_cfg": {"interval": "step", "frequency": 2},
                "init_pg_lrs": ["1e-3", 2e-3],
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
    # the flat {class_path, init_args} form is FTS's nested optimizer_init
    assert phases[2].new_optimizer.class_path == "torch.optim.SGD"
    assert phases[2].new_optimizer.init_args == {"lr": 0.1}
    sched = phases[2].new_lr_scheduler
    assert sched.lr_scheduler_init.class_path == "torch.optim.lr_scheduler.StepLR"
    assert (sched.pl_lrs_cfg.interval, sched.pl_lrs_cfg.frequency) == ("step", 2)
    assert sched.init_pg_lrs == [1e-3, 2e-3]  # FTS reads lrs with float()
    assert unscheduled_params(phases, NAMES) == ["model.embed.weight"]
    assert final_depth(phases, -1) == 2 and final_depth(phases, 1) == 1
    assert final_depth(phases, 7) == 2


def test_lr_scheduler_config_defaults_are_lightnings():
    """FTS builds Lightning's LRSchedulerConfig: interval epoch, frequency 1."""
    raw = {
        0: {"params": ["head.weight"]},
        1: {"params": ["head.bias"], "new_lr_scheduler": {"class_path": "x.Y"}},
    }
    cfg = parse_schedule(raw).phases[1].new_lr_scheduler
    assert (cfg.pl_lrs_cfg.interval, cfg.pl_lrs_cfg.frequency, cfg.pl_lrs_cfg.monitor) == (
        "epoch",
        1,
        None,
    )
    assert cfg.use_current_optimizer_pg_lrs is False and cfg.init_pg_lrs is None


def ok(**extra):
    """Phase 0 valid for NAMES, plus extra keys."""
    return {"params": ["head.weight"], **extra}


def bias(**extra):
    """Phase 1 valid for NAMES, plus extra keys."""
    return {"params": ["head.bias"], **extra}


OPT = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
STEP = {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR"}}
KEYS = "(strings of digits such as '1' are read as integers)"
ONE_PHASE = "each parameter may be thawed by one phase only"
REINIT0 = (
    "is a reinitialization directive for the initial phase, which is not allowed: the Trainer "
    "builds the initial optimizer and LR scheduler; reinitialization applies to phases >= 1 only"
)
PHASE_KEYS = (
    "lr, max_transition_epoch, max_transition_step, new_lr_scheduler, new_optimizer, params"
)

# (raw schedule, options, exact message)
INVALID = [
    pytest.param(
        {"a": ok()},
        {},
        f"phase key 'a' is not an integer: phases are keyed 0, 1, 2, ... {KEYS}",
        id="non-int-key",
    ),
    pytest.param(
        {0: ok(), 1.1: bias()},
        {},
        f"phase key 1.1 is not an integer: phases are keyed 0, 1, 2, ... {KEYS}",
        id="float-key",
    ),
    pytest.param(
        {True: ok()},
        {},
        f"phase key true is not an integer: phases are keyed 0, 1, 2, ... {KEYS}",
        id="bool-key",
    ),
    pytest.param(
        {0: ok(), "0": bias()},
        {},
        "phase keys '0' and 0 both name phase 0: each phase may appear only once",
        id="same-phase-as-string",
    ),
    pytest.param(
        {0: ok(), 2: bias()},
        {},
        "phase keys must be contiguous integers starting at 0, got [0, 2]: phase 1 is missing; "
        "renumbered in order (2 -> 1) the schedule would be valid",
        id="gap",
    ),
    pytest.param(
        {1: ok()},
        {},
        "phase keys must be contiguous integers starting at 0, got [1]: phase 0 is missing; "
        "renumbered in order (1 -> 0) the schedule would be valid",
        id="no-phase-0",
    ),
    pytest.param(
        {-1: ok(), 0: bias()},
        {},
        "phase keys must be contiguous integers starting at 0, got [-1, 0]: phase -1 is negative;"
        " renumbered in order (-1 -> 0, 0 -> 1) the schedule would be valid",
        id="negative-key",
    ),
    pytest.param(
        {0: ok(), 1: {"params": ["head.wieght"]}},
        {},
        "phase 1: params entry 'head.wieght' matches no parameter of the model "
        "(did you mean 'head.weight'?)",
        id="unknown-name",
    ),
    pytest.param(
        {0: {"params": [r"decoder\..*"]}},
        {},
        r"phase 0: params entry 'decoder\..*' matches no parameter of the model",
        id="regex-matches-nothing",
    ),
    pytest.param(
        {0: {"params": ["model.layers.(0"]}},
        {},
        "phase 0: params entry 'model.layers.(0' is neither a parameter name nor a valid regex "
        "(missing ) at position 15)",
        id="bad-regex",
    ),
    pytest.param(
        {0: {"params": [r"model\.layers\.1"]}, 1: {"params": ["model.layers.1.attn.bias"]}},
        {},
        "parameter 'model.layers.1.attn.bias' is scheduled in phase 0 and in phase 1 "
        f"(entry 'model.layers.1.attn.bias'): {ONE_PHASE}",
        id="param-in-two-phases",
    ),
    pytest.param(
        {0: {"params": ["head.bias", r"head\."]}},
        {},
        rf"parameter 'head.bias' is scheduled twice in phase 0 (entry 'head\.'): {ONE_PHASE}",
        id="param-twice-in-one-phase",
    ),
    pytest.param(
        {0: {"params": []}},
        {},
        "phase 0.params: [] must be a non-empty list of parameter names or regexes.",
        id="empty",
    ),
    pytest.param(
        {0: {"max_transition_epoch": 1}},
        {},
        "phase 0.params: required key is missing.",
        id="no-params",
    ),
    pytest.param(
        {0: {"params": [3]}}, {}, "phase 0.params[0]: expected a string, got int 3.", id="int"
    ),
    pytest.param(
        {0: {"params": ["head.weight", ""]}},
        {},
        "phase 0: params entry 1 is '': an empty name would match every parameter; write a "
        "parameter name or a regex",
        id="empty-name",
    ),
    pytest.param(
        {0: {"params": ["  "]}},
        {},
        "phase 0: params entry 0 is '  ': an empty name would match every parameter; write a "
        "parameter name or a regex",
        id="blank-name",
    ),
    pytest.param(
        {0: {"params": ["model.layers.0.attn.wei"]}},
        {},
        "phase 0: params entry 'model.layers.0.attn.wei' is not a parameter name, and as a regex "
        "it stops in the middle of 'model.layers.0.attn.weight': it looks truncated (did you "
        "mean 'model.layers.0.attn.weight'?); write the full parameter name",
        id="truncated-name",
    ),
    pytest.param(
        {0: {"params": ["model.layers.1"]}},
        {},
        "phase 0: params entry 'model.layers.1' is not a parameter name, and as a regex it stops "
        "in the middle of 'model.layers.10.attn.weight': it looks truncated; to thaw everything "
        r"under 'model.layers.1', end the regex at the dot: 'model\.layers\.1\.'",
        id="prefix-catches-layer-10",
    ),
    pytest.param(
        {0: {"params": [r"((?:\w|\.)*?)*\.(\w)*\2\d"]}},
        {},
        r"phase 0: params entry '((?:\w|\.)*?)*\.(\w)*\2\d' takes too long to match (more than "
        "0.25s for 8 parameter names; nested repetition such as '(a*)*' backtracks "
        "exponentially): simplify the regex",
        id="catastrophic-backtracking",
    ),
    pytest.param(
        {0: ok(max_transiton_epoch=2)},
        {},
        "phase 0.max_transiton_epoch: unknown key 'max_transiton_epoch' (did you mean "
        f"'max_transition_epoch'?); allowed keys: {PHASE_KEYS}.",
        id="typo-key",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=1.5)},
        {},
        "phase 0.max_transition_epoch: expected an integer, got float 1.5.",
        id="float-epoch",
    ),
    pytest.param(
        {0: ok(max_transition_step=-3)},
        {},
        "phase 0.max_transition_step: -3 must be >= 0, or -1 for no limit.",
        id="negative-step",
    ),
    pytest.param(
        {0: ok(), 1: bias(lr="fast")}, {}, "phase 1.lr: 'fast' is not a number.", id="non-float-lr"
    ),
    pytest.param(
        {0: ok(), 1: bias(lr=True)},
        {},
        "phase 1.lr: expected a number, got bool true.",
        id="bool-lr",
    ),
    pytest.param(
        {0: ok(), 1: bias(lr=float("inf"))},
        {},
        "phase 1.lr: .inf is not a finite number.",
        id="inf-lr",
    ),
    pytest.param(
        {0: ok(), 1: bias(lr=float("nan"))},
        {},
        "phase 1.lr: .nan is not a finite number.",
        id="nan-lr",
    ),
    pytest.param(
        {0: ok(), 1: bias(lr="NaN")},
        {},
        "phase 1.lr: .nan is not a finite number.",
        id="nan-string-lr",
    ),
    pytest.param(
        {0: ok(), 1: bias(lr=0.0)}, {}, "phase 1.lr: 0.0 must be greater than 0.", id="zero-lr"
    ),
    pytest.param(
        {0: ok(new_optimizer=OPT)},
        {},
        f"phase 0: new_optimizer {REINIT0}",
        id="reinit-optimizer-phase-0",
    ),
    pytest.param(
        {0: ok(new_lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR"})},
        {},
        f"phase 0: new_lr_scheduler {REINIT0}",
        id="reinit-scheduler-phase-0",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_optimizer={"init_args": {"lr": 1.0}})},
        {},
        "phase 1.new_optimizer.optimizer_init.class_path: required key is missing.",
        id="missing-class-path",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={"lr_scheduler_init": {"init_args": {}}})},
        {},
        "phase 1.new_lr_scheduler.lr_scheduler_init.class_path: required key is missing.",
        id="missing-class-path-nested",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={"pl_lrs_cfg": {"name": "otherwise_okay"}})},
        {},
        "phase 1.new_lr_scheduler.lr_scheduler_init: required key is missing.",
        id="missing-lr-scheduler-init",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_optimizer={**OPT, "init_arg": {}})},
        {},
        "phase 1.new_optimizer.optimizer_init.init_arg: unknown key 'init_arg' (did you mean "
        "'init_args'?); allowed keys: class_path, init_args.",
        id="reinit-typo",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "pl_lrs_cfg": {"interval": "throwerror"}})},
        {},
        "phase 1.new_lr_scheduler.pl_lrs_cfg.interval: 'throwerror' is not an allowed value; "
        "allowed: 'epoch', 'step'.",
        id="bad-interval",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "pl_lrs_cfg": {"frequency": 0}})},
        {},
        "phase 1.new_lr_scheduler.pl_lrs_cfg.frequency: 0 must be greater than or equal to 1.",
        id="zero-frequency",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "pl_lrs_cfg": {"whoops": "warnme"}})},
        {},
        "phase 1.new_lr_scheduler.pl_lrs_cfg.whoops: unknown key 'whoops'; allowed keys: "
        "frequency, interval, monitor, name, reduce_on_plateau, strict.",
        id="unknown-pl-lrs-key",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "pl_lrs_cfg": {"strict": False}})},
        {},
        "phase 1.new_lr_scheduler.pl_lrs_cfg.strict: false is not an allowed value; allowed: true.",
        id="non-strict-monitor",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "init_pg_lrs": [2.0e-06, "whoops"]})},
        {},
        "phase 1.new_lr_scheduler.init_pg_lrs[1]: 'whoops' is not a number.",
        id="non-float-init-pg-lrs",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "init_pg_lrs": [float("inf")]})},
        {},
        "phase 1.new_lr_scheduler.init_pg_lrs[0]: .inf is not a finite number.",
        id="inf-init-pg-lrs",
    ),
    pytest.param(
        {0: ok(), 1: bias(new_lr_scheduler={**STEP, "use_current_optimizer_pg_lrs": "yes"})},
        {},
        "phase 1.new_lr_scheduler.use_current_optimizer_pg_lrs: expected a boolean (true/false), "
        "got str 'yes'.",
        id="non-bool-use-current",
    ),
    pytest.param(
        {0: ok(), 1: bias()},
        {"epoch_transitions_only": True},
        "phase 0: epoch_transitions_only is set, so every phase but the last needs "
        "max_transition_epoch >= 0",
        id="epoch-only-missing-epoch",
    ),
    pytest.param(
        {0: ok(max_transition_epoch=1, max_transition_step=5), 1: bias()},
        {"epoch_transitions_only": True},
        "phase 0: max_transition_step is not allowed with epoch_transitions_only",
        id="epoch-only-step",
    ),
    pytest.param(
        {0: ["head.weight"]},
        {},
        "phase 0 must be a mapping with a params list, got list ['head.weight']",
        id="phase-not-mapping",
    ),
    pytest.param(
        {},
        {},
        "a fine-tuning schedule must be a non-empty mapping of phase -> settings, got dict {}",
        id="empty-schedule",
    ),
    pytest.param(
        [ok()],
        {},
        "a fine-tuning schedule must be a non-empty mapping of phase -> settings, got list "
        "[{'params': ['head.weight']}]",
        id="list-schedule",
    ),
]


@pytest.mark.parametrize("raw,opts,message", INVALID)
def test_invalid_schedules_name_phase_and_entry(raw, opts, message):
    start = time.monotonic()
    with pytest.raises(FTSScheduleError) as err:
        validate_schedule(raw, NAMES, **opts)
    assert str(err.value) == message
    assert time.monotonic() - start < 2.0  # the backtracking case is cut off, not waited out


def test_string_phase_keys_are_read_as_integers(caplog):
    """JSON has only string keys: FTS converts '1' to 1 (and says so)."""
    parsed = parse_schedule({"0": ok(), "1": bias(lr="1e-4")})
    assert parsed.converted_keys == ("0", "1")
    assert parsed.notes == ("phase keys '0', '1' were read as integers",)
    assert sorted(parsed.raw) == [0, 1]
    phases = validate_schedule({"0": ok(), "1": bias(lr="1e-4")}, NAMES)
    assert [p.params for p in phases] == [("head.weight",), ("head.bias",)]
    assert phases[1].lr == pytest.approx(1e-4)


def test_phase0_lr_is_accepted_with_a_note():
    """FTS test_fts_invalid_schedules[lr_phase0]: a warning, and the lr is not used."""
    parsed = parse_schedule({0: ok(lr=5e-4), 1: bias()})
    assert parsed.notes == (
        "phase 0: lr 0.0005 is not used: phase 0 trains at the lr the Trainer's optimizer has "
        "(TrainingArguments.learning_rate, or your optimizer's); set it there",
    )
    assert parsed.raw[0] == {"params": ["head.weight"], "lr": 5e-4}


@pytest.mark.parametrize(
    "epochs,expected",
    [
        ((1, 4, 6), 6),  # the final phase's limit
        ((1, 6, 4), 6),  # an earlier phase's larger limit counts once the final phase has one
        ((9, 2, 3), 3),  # phase 0's limit does not count
        ((1, 6, -1), None),  # no limit on the final phase: the run's length is the user's
        ((5,), None),  # one phase: nothing to extend
    ],
)
def test_schedule_epochs_follow_fts_max_epochs_rule(epochs, expected):
    raw = {d: {"params": [f"p{d}"], "max_transition_epoch": e} for d, e in enumerate(epochs)}
    assert schedule_epochs(parse_schedule(raw).phases) == expected


def test_epoch_transitions_only_accepts_last_phase_without_epoch():
    raw = {0: ok(max_transition_epoch=1), 1: bias()}
    phases = validate_schedule(raw, NAMES, epoch_transitions_only=True)
    assert [p.max_transition_epoch for p in phases] == [1, -1]


def test_shrinking_transition_limits_are_accepted_with_a_note(caplog):
    """FTS only notes a max_transition_epoch below an earlier phase's: that phase lasts one."""
    raw = {0: ok(max_transition_epoch=3), 1: bias(max_transition_epoch=2)}
    with caplog.at_level(logging.INFO, logger="fms_acceleration_fts.schedule"):
        phases = validate_schedule(raw, NAMES)
    assert [p.max_transition_epoch for p in phases] == [3, 2]
    assert "phase 1's max_transition_epoch (2) is not above phase 0's (3)" in caplog.text


def test_tied_alias_is_dropped_with_a_warning(caplog):
    names = ["embed.weight", "head.bias"]  # head.weight is embed.weight (tied)
    raw = {0: {"params": ["head.weight", "head.bias"]}, 1: {"params": ["embed.weight"]}}
    with caplog.at_level(logging.WARNING):
        phases = validate_schedule(raw, names, shared_aliases={"head.weight": "embed.weight"})
    assert [p.params for p in phases] == [("head.bias",), ("embed.weight",)]
    assert "phase 0: 'head.weight' is a tied (shared) parameter" in caplog.text
    with pytest.raises(FTSScheduleError, match="'head.weight' matches no parameter"):
        validate_schedule(raw, names)


def test_duplicate_yaml_keys_are_errors():
    text = "0:\n  params: [head.weight]\n1:\n  params: [head.bias]\n0:\n  params: [x]\n"
    with pytest.raises(FTSScheduleError) as err:
        load_schedule_yaml(text, "s.yaml")
    assert str(err.value) == "s.yaml: duplicate key '0' at line 5 (first defined at line 1)."
    text = "0:\n  params: [head.weight]\n  lr: 1.0\n  lr: 2.0\n"
    with pytest.raises(FTSScheduleError, match=r"duplicate key 'lr' at line 4"):
        load_schedule_yaml(text)


def test_yaml_exponent_floats_validate_and_round_trip(tmp_path):
    text = "0:\n  params: [head.weight]\n1:\n  params: [head.bias]\n  lr: 1e-5\n"
    raw = load_schedule_yaml(text)
    assert raw[1]["lr"] == "1e-5"  # YAML 1.1 reads it as a string; FTS reads it with float()
    assert validate_schedule(raw, NAMES)[1].lr == pytest.approx(1e-5)
    path = write_schedule(raw, tmp_path / "s.yaml")
    assert read_schedule(path) == raw
    assert validate_schedule(read_schedule(path), NAMES)[1].lr == pytest.approx(1e-5)


def test_read_schedule_errors(tmp_path):
    with pytest.raises(FTSScheduleError) as err:
        read_schedule(tmp_path / "missing.yaml")
    assert str(err.value) == f"{tmp_path}/missing.yaml: ft_schedule file does not exist."
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(FTSScheduleError) as err:
        read_schedule(tmp_path / "empty.yaml")
    assert str(err.value) == f"{tmp_path}/empty.yaml: the ft_schedule file is empty."
    (tmp_path / "bad.yaml").write_text("0: [unclosed\n")
    with pytest.raises(FTSScheduleError, match=r"bad.yaml: YAML syntax error at line 2, column 1"):
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
    with pytest.raises(FTSScheduleError, match=r"phase_size must be >= 1"):
        default_schedule(NAMES, 0)


def test_write_new_file_never_replaces_a_different_file(tmp_path):
    target = tmp_path / "M_ft_schedule.yaml"
    target.write_text("mine\n")
    path, renamed = write_new_file("generated\n", target)
    assert (path, renamed) == (str(tmp_path / "M_ft_schedule_1.yaml"), True)
    assert target.read_text() == "mine\n"
    # the same content again: found, not copied a third time
    assert write_new_file("generated\n", target) == (path, True)
    assert write_new_file("mine\n", target) == (str(target), False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "M_ft_schedule.yaml",
        "M_ft_schedule_1.yaml",
    ]


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

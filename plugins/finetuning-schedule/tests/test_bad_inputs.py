"""Bad input to the finetuning-schedule plugin: one clear error each, no traceback, nothing lost.

Schedule files and stanza options go through `fms-acceleration check` (which builds the
framework as `train` does), gen-schedule through its CLI, both in-process with stderr captured;
model-dependent checks and resume through the Python API, where the error is one of the types
`fms-acceleration train` reports in one line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import yaml

from fms_acceleration import AccelerationFrameworkError, AccelerationPluginConfigError
from fms_acceleration.cli import main
from fms_acceleration.testing import build_framework, save_tiny_model, write_config
from fms_acceleration_adapters import strategy_names
from fms_acceleration_fts import FinetuningSchedulePlugin, FTSTransitionError

STANZA = "plugins.training.finetuning_schedule"
OK0 = "0:\n  params: [lm_head.weight]\n"
STEP = "torch.optim.lr_scheduler.StepLR"
PLATEAU = "torch.optim.lr_scheduler.ReduceLROnPlateau"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(6)
)


def phase1(extra: str) -> str:
    return OK0 + "1:\n  params: [model.norm.weight]\n" + extra


def run_check(tmp_path, monkeypatch, capsys, stanza, files=None) -> str:
    """`fms-acceleration check accel.yaml` in tmp_path; the one stderr line (exit code 1)."""
    monkeypatch.chdir(tmp_path)
    for name, content in (files or {}).items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            path.mkdir()
        else:
            path.write_text(content)
    write_config(
        tmp_path / "accel.yaml", {"plugins": {"training": {"finetuning_schedule": stanza}}}
    )
    code = main(["check", "accel.yaml"])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert code == 1, out.out
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.err
    return errors[0]


SCHEDULE = f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: "
KEYS = "(strings of digits such as '1' are read as integers)"

# (files, expected error line); the stanza is {ft_schedule: s.yaml}
SCHEDULE_FILES = {
    "missing-file": (
        {},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: ft_schedule file does not exist.",
    ),
    "folder": (
        {"s.yaml": None},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: is a folder, expected a ft_schedule "
        "file.",
    ),
    "empty-file": (
        {"s.yaml": ""},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: the ft_schedule file is empty.",
    ),
    "yaml-syntax": (
        {"s.yaml": "0: [unclosed\n"},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: YAML syntax error at line 2, column 1: "
        "expected ',' or ']', but got '<stream end>'.",
    ),
    "duplicate-phase": (
        {"s.yaml": OK0 + OK0},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: duplicate key '0' at line 3 (first "
        "defined at line 1).",
    ),
    "not-utf8": (
        {"s.yaml": b"0:\n  params: [caf\xe9]\n"},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: the ft_schedule file is not UTF-8 "
        "text (byte 0xe9 at line 2); save it as UTF-8.",
    ),
    "alias-bomb": (
        {"s.yaml": BOMB},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: aliases expand to 12,345,685 values "
        "(at most 100,000); this looks like an alias bomb.",
    ),
    "deep-nesting": (
        {"s.yaml": "0: " + "[" * 70 + "]" * 70 + "\n"},
        f"error: accel.yaml: {STANZA}.ft_schedule: s.yaml: nesting is 71 levels deep; at most 64 "
        "are allowed.",
    ),
    "list-schedule": (
        {"s.yaml": "- params: [a]\n"},
        SCHEDULE + "a fine-tuning schedule must be a non-empty mapping of phase -> settings, got "
        "list [{'params': ['a']}]",
    ),
    "word-phase-key": (
        {"s.yaml": "first:\n  params: [a]\n"},
        SCHEDULE + f"phase key 'first' is not an integer: phases are keyed 0, 1, 2, ... {KEYS}",
    ),
    "non-contiguous": (
        {"s.yaml": OK0 + "2:\n  params: [b]\n"},
        SCHEDULE + "phase keys must be contiguous integers starting at 0, got [0, 2]: phase 1 is "
        "missing; renumbered in order (2 -> 1) the schedule would be valid; the renumbered "
        "schedule is in <tmp>/s_valid.yaml",
    ),
    "phase-not-mapping": (
        {"s.yaml": "0: [lm_head.weight]\n"},
        SCHEDULE + "phase 0 must be a mapping with a params list, got list ['lm_head.weight']",
    ),
    "no-params": (
        {"s.yaml": "0:\n  lr: 1.0e-3\n"},
        SCHEDULE + "phase 0.params: required key is missing.",
    ),
    "empty-params": (
        {"s.yaml": "0:\n  params: []\n"},
        SCHEDULE + "phase 0.params: [] must be a non-empty list of parameter names or regexes.",
    ),
    "empty-name": (
        {"s.yaml": "0:\n  params: ['']\n"},
        SCHEDULE + "phase 0: params entry 0 is '': an empty name would match every parameter; "
        "write a parameter name or a regex",
    ),
    "bad-regex": (
        {"s.yaml": "0:\n  params: ['model.layers[0']\n"},
        SCHEDULE + "phase 0: params entry 'model.layers[0' is neither a parameter name nor a "
        "valid regex (unterminated character set at position 14)",
    ),
    "inf-lr": (
        {"s.yaml": phase1("  lr: .inf\n")},
        SCHEDULE + "phase 1.lr: .inf is not a finite number.",
    ),
    "nan-lr": (
        {"s.yaml": phase1("  lr: .nan\n")},
        SCHEDULE + "phase 1.lr: .nan is not a finite number.",
    ),
    "word-lr": (
        {"s.yaml": phase1("  lr: fast\n")},
        SCHEDULE + "phase 1.lr: 'fast' is not a number.",
    ),
    "negative-lr": (
        {"s.yaml": phase1("  lr: -1.0e-4\n")},
        SCHEDULE + "phase 1.lr: -0.0001 must be greater than 0.",
    ),
    "key-typo": (
        {"s.yaml": "0:\n  params: [a]\n  max_transiton_epoch: 1\n"},
        SCHEDULE + "phase 0.max_transiton_epoch: unknown key 'max_transiton_epoch' (did you mean "
        "'max_transition_epoch'?); allowed keys: lr, max_transition_epoch, max_transition_step, "
        "new_lr_scheduler, new_optimizer, params.",
    ),
    "optimizer-not-importable": (
        {
            "s.yaml": phase1(
                "  new_optimizer:\n    optimizer_init:\n      class_path: torch.optim.Adamm\n"
            )
        },
        SCHEDULE + "phase 1.new_optimizer.optimizer_init.class_path: module 'torch.optim' has no "
        "attribute 'Adamm' (did you mean 'Adam'?) (class_path 'torch.optim.Adamm')",
    ),
    "optimizer-init-fails": (
        {
            "s.yaml": phase1(
                "  new_optimizer:\n    optimizer_init:\n      class_path: torch.optim.SGD\n"
                "      init_args: {lr: 0.1, momentun: 0.9}\n"
            )
        },
        SCHEDULE + "phase 1.new_optimizer.optimizer_init.init_args: SGD(params, **{'lr': 0.1, "
        "'momentun': 0.9}) fails: TypeError: SGD.__init__() got an unexpected keyword argument "
        "'momentun'",
    ),
    "scheduler-unsupported": (
        {
            "s.yaml": phase1(
                "  new_lr_scheduler:\n    lr_scheduler_init:\n"
                "      class_path: torch.optim.lr_scheduler.OneCycleLR\n"
            )
        },
        SCHEDULE + "phase 1.new_lr_scheduler.lr_scheduler_init.class_path: OneCycleLR is not a "
        "supported LR scheduler (new param groups cannot join it); use one of LambdaLR, "
        "MultiplicativeLR, StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR, "
        "ReduceLROnPlateau, CosineAnnealingWarmRestarts, ConstantLR, LinearLR, PolynomialLR (or a "
        "subclass), or set allow_untested: true to try it anyway",
    ),
    "scheduler-init-fails": (
        {
            "s.yaml": phase1(
                f"  new_lr_scheduler:\n    lr_scheduler_init:\n      class_path: {STEP}\n"
            )
        },
        SCHEDULE + "phase 1.new_lr_scheduler.lr_scheduler_init.init_args: StepLR(optimizer, **{}) "
        "fails: TypeError: StepLR.__init__() missing 1 required positional argument: 'step_size'",
    ),
    "plateau-without-monitor": (
        {
            "s.yaml": phase1(
                f"  new_lr_scheduler:\n    lr_scheduler_init:\n      class_path: {PLATEAU}\n"
            )
        },
        SCHEDULE + "phase 1.new_lr_scheduler.pl_lrs_cfg.monitor: the lr scheduler config must "
        "include a monitor when a ReduceLROnPlateau scheduler is used; set it to the metric to "
        "reduce on, the same as TrainingArguments.metric_for_best_model (the Trainer steps "
        "ReduceLROnPlateau with that metric)",
    ),
    "bad-interval": (
        {
            "s.yaml": phase1(
                f"  new_lr_scheduler:\n    lr_scheduler_init:\n      class_path: {STEP}\n"
                "      init_args: {step_size: 1}\n    pl_lrs_cfg: {interval: batch}\n"
            )
        },
        SCHEDULE + "phase 1.new_lr_scheduler.pl_lrs_cfg.interval: 'batch' is not an allowed "
        "value; allowed: 'epoch', 'step'.",
    ),
    "nan-init-pg-lr": (
        {
            "s.yaml": phase1(
                f"  new_lr_scheduler:\n    lr_scheduler_init:\n      class_path: {STEP}\n"
                "      init_args: {step_size: 1}\n    init_pg_lrs: [.nan]\n"
            )
        },
        SCHEDULE + "phase 1.new_lr_scheduler.init_pg_lrs[0]: .nan is not a finite number.",
    ),
    "epoch-only-missing-epoch": (
        {"s.yaml": phase1("")},
        None,  # with epoch_transitions_only: see the stanza table
    ),
}


@pytest.mark.parametrize("case", [k for k, v in SCHEDULE_FILES.items() if v[1] is not None])
def test_bad_schedule_file_is_one_error_in_check(tmp_path, monkeypatch, capsys, case):
    files, expected = SCHEDULE_FILES[case]
    expected = expected.replace("<tmp>", str(tmp_path))
    assert run_check(tmp_path, monkeypatch, capsys, {"ft_schedule": "s.yaml"}, files) == expected
    if case == "non-contiguous":  # FTS writes the renumbered schedule for the user to check
        assert yaml.safe_load((tmp_path / "s_valid.yaml").read_text()) == {
            0: {"params": ["lm_head.weight"]},
            1: {"params": ["b"]},
        }


OPTS = f"error: accel.yaml: {STANZA}"
# (stanza, expected error line)
STANZAS = {
    "adapter-option-typo": (
        {"strategy_adapter_cfg": {"phase_sise": 2}},
        f"{OPTS}.strategy_adapter_cfg.phase_sise: unknown key 'phase_sise' (did you mean "
        "'phase_size'?); allowed keys (adapters ddp, fsdp, peft, single_device): "
        "default_schedule_trainable_only, peft, peft_adapter_name, phase_size, "
        "separate_process_group, sync_thawed_grads.",
    ),
    "adapter-option-type": (
        {"strategy_adapter_cfg": {"phase_size": "two"}},
        f"{OPTS}.strategy_adapter_cfg.phase_size: expected an integer, got str 'two'.",
    ),
    "adapter-option-value": (
        {"strategy_adapter_cfg": {"phase_size": 0}},
        f"{OPTS}.strategy_adapter_cfg.phase_size: 0 must be greater than or equal to 1.",
    ),
    "custom-adapter-module-missing": (
        {"custom_strategy_adapters": {"ddp": "nopkg.adapters:Mine"}},
        f"{OPTS}.custom_strategy_adapters.ddp: strategy adapter 'nopkg.adapters:Mine': cannot "
        "import module 'nopkg.adapters': ModuleNotFoundError: No module named 'nopkg'",
    ),
    "custom-adapter-class-missing": (
        {"custom_strategy_adapters": {"ddp": "fms_acceleration_adapters:Nope"}},
        f"{OPTS}.custom_strategy_adapters.ddp: strategy adapter 'fms_acceleration_adapters:Nope': "
        "module 'fms_acceleration_adapters' has no attribute 'Nope'",
    ),
    "custom-adapter-not-an-adapter": (
        {"custom_strategy_adapters": {"ddp": "torch.optim:SGD"}},
        f"{OPTS}.custom_strategy_adapters.ddp: strategy adapter 'torch.optim:SGD' resolves to "
        "<class 'torch.optim.sgd.SGD'>, which is not a subclass of "
        "fms_acceleration_adapters.StrategyAdapter",
    ),
    "custom-adapter-unknown-strategy": (
        {"custom_strategy_adapters": {"fdsp": "fms_acceleration_adapters:FSDPStrategyAdapter"}},
        f"{OPTS}.custom_strategy_adapters.fdsp: unknown strategy 'fdsp' (mapped to "
        "'fms_acceleration_adapters:FSDPStrategyAdapter') (did you mean 'fsdp'?); strategies: "
        f"{', '.join(strategy_names())}, or an accelerate DistributedType value such as NO, "
        "MULTI_GPU or FSDP",
    ),
    "stanza-key-typo": (
        {"restore_bset": True},
        f"{OPTS}.restore_bset: unknown key 'restore_bset' (did you mean 'restore_best'?); allowed "
        "keys: allow_partial_resume, allow_untested, apply_lambdas_new_pgs, base_max_lr, "
        "custom_strategy_adapters, early_stopping, enforce_phase0_params, "
        "epoch_transitions_only, frozen_bn_track_running_stats, ft_schedule, log_dir, max_depth, "
        "no_decay, reinit_lr_cfg, reinit_optim_cfg, restore_best, strategy_adapter_cfg.",
    ),
    "patience-zero": (
        {"early_stopping": {"patience": 0}},
        f"{OPTS}.early_stopping.patience: 0 must be greater than 0.",
    ),
    "negative-min-delta": (
        {"early_stopping": {"min_delta": -0.5}},
        f"{OPTS}.early_stopping.min_delta: -0.5 must be greater than or equal to 0.",
    ),
    "mode-typo": (
        {"early_stopping": {"mode": "mni"}},
        f"{OPTS}.early_stopping.mode: 'mni' is not an allowed value (did you mean 'min'?); "
        "allowed: 'min', 'max'.",
    ),
    "nan-threshold": (
        {"early_stopping": {"stopping_threshold": float("nan")}},
        f"{OPTS}.early_stopping.stopping_threshold: .nan is not a finite number.",
    ),
    "negative-base-lr": (
        {"base_max_lr": -1.0e-5},
        f"{OPTS}.base_max_lr: -1e-05 must be greater than 0.",
    ),
    "inf-base-lr": (
        {"base_max_lr": float("inf")},
        f"{OPTS}.base_max_lr: .inf is not a finite number.",
    ),
    "max-depth": (
        {"max_depth": -2},
        f"{OPTS}.max_depth: -2 must be -1 (all phases) or a phase index >= 0.",
    ),
    "partial-resume-type": (
        {"allow_partial_resume": "yes"},
        f"{OPTS}.allow_partial_resume: expected a boolean (true/false), got str 'yes'.",
    ),
    "schedule-and-reinit-lr": (
        {
            "ft_schedule": {0: {"params": ["a"]}},
            "reinit_lr_cfg": {"lr_scheduler_init": {"class_path": STEP}},
        },
        f"{OPTS}: ft_schedule and reinit_lr_cfg cannot be combined: reinit_lr_cfg rebuilds one LR "
        "scheduler config at every phase of the implicit (generated) schedule; with an explicit "
        "schedule, put new_lr_scheduler in its phases instead",
    ),
    "implicit-init-pg-lrs": (
        {
            "reinit_lr_cfg": {
                "lr_scheduler_init": {"class_path": STEP, "init_args": {"step_size": 1}},
                "init_pg_lrs": [1.0e-5],
            }
        },
        f"{OPTS}.reinit_lr_cfg.init_pg_lrs: not allowed in reinit_lr_cfg (implicit mode): the "
        "same lr scheduler config is rebuilt at every phase, so one list of per-group lrs "
        "cannot fit them all",
    ),
    "implicit-optimizer-missing": (
        {"reinit_optim_cfg": {"optimizer_init": {"class_path": "torch.optim.Adamw"}}},
        f"{OPTS}.reinit_optim_cfg.optimizer_init.class_path: module 'torch.optim' has no "
        "attribute 'Adamw' (did you mean 'AdamW'?) (class_path 'torch.optim.Adamw')",
    ),
    "epoch-only-missing-epoch": (
        {
            "ft_schedule": {0: {"params": ["a"]}, 1: {"params": ["b"]}},
            "epoch_transitions_only": True,
        },
        f"{OPTS}.ft_schedule: phase 0: epoch_transitions_only is set, so every phase but the last "
        "needs max_transition_epoch >= 0",
    ),
    "inline-schedule-string-key": (
        {"ft_schedule": {"0": {"params": ["a"], "max_transition_epoch": -2}}},
        f"{OPTS}.ft_schedule: phase 0.max_transition_epoch: -2 must be >= 0, or -1 for no limit.",
    ),
}


@pytest.mark.parametrize("case", list(STANZAS))
def test_bad_stanza_option_is_one_error_in_check(tmp_path, monkeypatch, capsys, case):
    stanza, expected = STANZAS[case]
    assert run_check(tmp_path, monkeypatch, capsys, stanza) == expected


def test_good_config_checks_ok(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(phase1("  lr: '1e-4'\n"))
    write_config(
        tmp_path / "accel.yaml",
        {"plugins": {"training": {"finetuning_schedule": {
            "ft_schedule": "s.yaml", "strategy_adapter_cfg": {"sync_thawed_grads": True}}}}},
    )  # fmt: skip
    assert main(["check", "accel.yaml"]) == 0
    assert capsys.readouterr().out.startswith("accel.yaml: OK\n")


# ------------------------------------------------------------------------------ gen-schedule
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(
        tmp_path_factory.mktemp("m") / "model", num_hidden_layers=1, hidden_size=32,
        intermediate_size=64,
    )  # fmt: skip


def gen(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["gen-schedule", *argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


USAGE = "fms-acceleration gen-schedule: error: argument --phase-size: "


@pytest.mark.parametrize(
    "size,message",
    [
        ("0", "0 is not a phase size: each phase needs at least 1 tensor"),
        ("-2", "-2 is not a phase size: each phase needs at least 1 tensor"),
        ("two", "'two' is not an integer"),
    ],
    ids=["zero", "negative", "word"],
)
def test_gen_schedule_bad_phase_size(tmp_path, capsys, model_dir, size, message):
    code, _, err = gen(capsys, str(model_dir), "-o", str(tmp_path / "s.yaml"), "--phase-size", size)
    assert code == 2 and err.splitlines()[-1] == USAGE + message
    assert not (tmp_path / "s.yaml").exists()


def test_gen_schedule_never_overwrites_without_force(tmp_path, capsys, model_dir):
    out = tmp_path / "mine.yaml"
    out.write_text("my schedule\n")
    code, _, err = gen(capsys, str(model_dir), "-o", str(out))
    assert (code, err) == (
        2,
        f"gen-schedule: {out} exists; pass --force to overwrite it, or choose another -o\n",
    )
    assert out.read_text() == "my schedule\n"
    # not even the model's own config.json
    config = model_dir / "config.json"
    before = config.read_text()
    code, _, err = gen(capsys, str(model_dir), "-o", str(config))
    assert code == 2 and err.startswith(f"gen-schedule: {config} exists; pass --force")
    assert config.read_text() == before
    code, stdout, _ = gen(capsys, str(model_dir), "-o", str(out), "--force")
    assert code == 0 and stdout == f"wrote 6 phases for LlamaForCausalLM to {out}\n"
    assert len(yaml.safe_load(out.read_text())) == 6


@pytest.mark.parametrize(
    "setup,problem",
    [
        ("missing", "no such folder"),
        ("file", "it is a file; pass the model's folder"),
        ("empty", "the folder has no config.json"),
        (
            "corrupt",
            "{target}/config.json is not valid JSON (Expecting property name enclosed in double "
            "quotes: line 1 column 25 (char 24))",
        ),
        (
            "unknown-architecture",
            "Unrecognized model in {target}. Should have a `model_type` key in its config.json.",
        ),
    ],
)
def test_gen_schedule_bad_model_dir(tmp_path, capsys, setup, problem):
    target = tmp_path / "model"
    if setup == "file":
        target.write_text("weights")
    elif setup != "missing":
        target.mkdir()
    if setup == "corrupt":
        (target / "config.json").write_text('{"model_type": "llama", ')
    if setup == "unknown-architecture":
        (target / "config.json").write_text('{"hidden_size": 8}')
    code, _, err = gen(capsys, str(target), "-o", str(tmp_path / "s.yaml"))
    expected = problem.format(target=target)
    line = f"gen-schedule: cannot read a model config from '{target}': {expected}\n"
    if setup == "unknown-architecture":
        # transformers' own words: 4.55 goes on to list every model type it knows
        head = line.split("` key in its config.json")[0]
        assert code == 2 and err.startswith(head) and err.count("\n") == 1, err
    else:
        assert (code, err) == (2, line)


# ----------------------------------------------------------------------- names (need a model)
@pytest.mark.parametrize(
    "entry,message",
    [
        (
            "model.layers.0.self_attn.q_pro",
            "phase 0: params entry 'model.layers.0.self_attn.q_pro' is not a parameter name, and "
            "as a regex it stops in the middle of 'model.layers.0.self_attn.q_proj.weight': it "
            "looks truncated (did you mean 'model.layers.0.self_attn.q_proj.weight'?); write the "
            "full parameter name",
        ),
        (
            "model.layers.0.mlp.gate",
            "phase 0: params entry 'model.layers.0.mlp.gate' is not a parameter name, and as a "
            "regex it stops in the middle of 'model.layers.0.mlp.gate_proj.weight': it looks "
            "truncated (did you mean 'model.layers.0.mlp.gate_proj.weight'?); write the full "
            "parameter name",
        ),
        (
            "lm_head.wieght",
            "phase 0: params entry 'lm_head.wieght' matches no parameter of the model (did you "
            "mean 'lm_head.weight'?)",
        ),
        (
            r"((?:\w|\.)*?)*\.(\w)*\2\d",
            r"phase 0: params entry '((?:\w|\.)*?)*\.(\w)*\2\d' takes too long to match (more "
            "than 0.25s for 12 parameter names; nested repetition such as '(a*)*' backtracks "
            "exponentially): simplify the regex",
        ),
    ],
    ids=["truncated", "truncated-module", "unknown", "catastrophic-regex"],
)
def test_bad_parameter_names_are_refused(tmp_path, h, entry, message):
    framework = build_framework(
        {
            "plugins": {
                "training": {"finetuning_schedule": {"ft_schedule": {0: {"params": [entry]}}}}
            }
        },
        [FinetuningSchedulePlugin],
    )
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework.augmentation(h.tiny_model(), h.train_args(str(tmp_path)), modifiable_args=())
    assert str(err.value) == f"{STANZA}.ft_schedule: {message}"


def test_monitored_metric_missing_is_an_error(tmp_path, h):
    """FTSEarlyStopping's strict: a monitor that no evaluation reports stops the run at once."""
    stanza = {"ft_schedule": h.SCHEDULE, "early_stopping": {"monitor": "eval_accuracy"}}
    with pytest.raises(AccelerationFrameworkError) as err:
        h.run_fts(str(tmp_path), stanza)
    assert str(err.value) == (
        "early stopping monitors 'eval_accuracy', which is not among the evaluation metrics "
        "(epoch, eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second); set "
        "early_stopping.monitor to one of them (or early_stopping.strict: false to train on "
        "without it)"
    )


def test_plateau_monitor_must_be_the_trainers_metric(tmp_path, h):
    sched = {k: dict(v) for k, v in h.SCHEDULE.items()}
    sched[1]["new_lr_scheduler"] = {
        "lr_scheduler_init": {"class_path": PLATEAU},
        "pl_lrs_cfg": {"monitor": "eval_loss"},
    }
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": sched}}}},
        [FinetuningSchedulePlugin],
    )
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework.augmentation(h.tiny_model(), h.train_args(str(tmp_path)), modifiable_args=())
    assert str(err.value) == (
        f"{STANZA}.ft_schedule: phase 1.new_lr_scheduler.pl_lrs_cfg.monitor: 'eval_loss', but the "
        "Trainer steps ReduceLROnPlateau with TrainingArguments.metric_for_best_model, which is "
        "None: set metric_for_best_model='eval_loss'"
    )


def test_plateau_scheduler_needs_the_trainers_metric(tmp_path, h):
    """A user ReduceLROnPlateau without metric_for_best_model: refused before step 0 (the
    Trainer would fail at the first evaluation with 'NoneType' object has no attribute ...)."""
    import torch
    from transformers import Trainer

    from fms_acceleration.testing import tiny_dataset

    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": h.SCHEDULE}}}},
        [FinetuningSchedulePlugin],
    )
    args = h.train_args(str(tmp_path))
    model, _ = framework.augmentation(h.tiny_model(), args, modifiable_args=())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(n=8, seq_len=8),
        eval_dataset=tiny_dataset(n=4, seq_len=8),
        optimizers=(opt, plateau),
    )
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    with pytest.raises(FTSTransitionError) as err:
        trainer.train()
    assert str(err.value) == (
        "the LR scheduler is ReduceLROnPlateau, which the Trainer steps after each evaluation "
        "with TrainingArguments.metric_for_best_model, and that is not set: set it to the metric "
        "to reduce on (e.g. eval_loss)"
    )
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------------- nothing overwritten
def test_default_schedule_never_replaces_a_users_file(tmp_path, h, caplog):
    mine = tmp_path / "LlamaForCausalLM_ft_schedule.yaml"
    mine.write_text("# my own schedule\n0:\n  params: [lm_head.weight]\n")
    args = h.train_args(str(tmp_path), num_train_epochs=1, save_strategy="no", eval_strategy="no")
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_fts"):
        _, plugin, _ = h.run_fts(str(tmp_path), {"max_depth": 0}, args=args)
    assert mine.read_text() == "# my own schedule\n0:\n  params: [lm_head.weight]\n"
    written = tmp_path / "LlamaForCausalLM_ft_schedule_1.yaml"
    assert plugin.callback.state.written == {"LlamaForCausalLM_ft_schedule.yaml": str(written)}
    assert len(yaml.safe_load(written.read_text())) == 6
    assert f"{mine} exists and differs, so the generated default schedule was written to " in (
        caplog.text
    )


# ------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, h):
    """A 2-epoch run of the 3-phase schedule saving checkpoint-4 and checkpoint-8."""
    out = tmp_path_factory.mktemp("ref")
    h.run_fts(
        str(out), {"ft_schedule": h.SCHEDULE}, args=h.train_args(str(out), num_train_epochs=2)
    )
    return out


def damaged(tmp_path, checkpoints, damage) -> str:
    dest = tmp_path / "checkpoint-4"
    shutil.copytree(checkpoints / "checkpoint-4", dest)
    damage(dest)
    return str(dest)


def resume(tmp_path, h, ckpt, **options):
    args = h.train_args(str(tmp_path), num_train_epochs=2)
    return h.run_fts(str(tmp_path), {"ft_schedule": h.SCHEDULE, **options}, args=args, resume=ckpt)


def test_resume_from_truncated_state_file_names_it(tmp_path, h, checkpoints):
    def truncate(ckpt):
        text = (ckpt / "fts_state.json").read_text()
        (ckpt / "fts_state.json").write_text(text[: len(text) // 2])

    ckpt = damaged(tmp_path, checkpoints, truncate)
    with pytest.raises(FTSTransitionError) as err:
        resume(tmp_path, h, ckpt)
    message = str(err.value)
    assert message.startswith(f"{ckpt}/fts_state.json is damaged (JSONDecodeError: ")
    assert message.endswith(
        "restore it from a good copy of the checkpoint, or delete it to resume from the copy of "
        "the schedule state kept in optimizer.pt"
    )


def test_resume_from_state_file_without_depth_names_it(tmp_path, h, checkpoints):
    def blank(ckpt):
        (ckpt / "fts_state.json").write_text(json.dumps({"n_phases": 3}))

    ckpt = damaged(tmp_path, checkpoints, blank)
    with pytest.raises(FTSTransitionError) as err:
        resume(tmp_path, h, ckpt)
    assert str(err.value) == (
        f"{ckpt}/fts_state.json is damaged: depth, wait, epochs_checked missing or not an "
        "integer; restore it from a good copy of the checkpoint, or delete it to resume from the "
        "copy of the schedule state kept in optimizer.pt"
    )


REFUSED = (
    "cannot resume the fine-tuning schedule at step 4 from {ckpt}: {what}. Resume from a complete "
    "checkpoint, or set allow_partial_resume: true to continue anyway (fresh optimizer state; "
    "without schedule state the schedule restarts at phase 0)"
)


@pytest.mark.parametrize(
    "removed,what",
    [
        (["optimizer.pt"], "its optimizer state (optimizer.pt and scheduler.pt) was not loaded"),
        (["scheduler.pt"], "its optimizer state (optimizer.pt and scheduler.pt) was not loaded"),
        (
            ["optimizer.pt", "fts_state.json"],
            "its optimizer state (optimizer.pt and scheduler.pt) was not loaded and it has no "
            "schedule state ({ckpt}/fts_state.json is missing)",
        ),
    ],
    ids=["no-optimizer", "no-scheduler", "no-optimizer-no-state"],
)
def test_partial_resume_is_refused_unless_allowed(tmp_path, h, checkpoints, caplog, removed, what):
    ckpt = damaged(tmp_path, checkpoints, lambda c: [os.remove(c / f) for f in removed])
    with pytest.raises(FTSTransitionError) as err:
        resume(tmp_path, h, ckpt)
    assert str(err.value) == REFUSED.format(ckpt=ckpt, what=what.format(ckpt=ckpt))
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_fts"):
        trainer, _, _ = resume(tmp_path, h, ckpt, allow_partial_resume=True)
    assert f"partial resume (allow_partial_resume) from {ckpt}" in caplog.text
    assert trainer.state.global_step == 8


def test_state_file_missing_uses_the_copy_in_optimizer(tmp_path, h, checkpoints, caplog):
    ckpt = damaged(tmp_path, checkpoints, lambda c: os.remove(c / "fts_state.json"))
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_fts"):
        trainer, plugin, _ = resume(tmp_path, h, ckpt)
    assert f"{ckpt}/fts_state.json is missing; using the copy of the schedule state" in caplog.text
    assert [t["global_step"] for t in plugin.callback.state.transitions] == [4]
    assert trainer.state.global_step == 8

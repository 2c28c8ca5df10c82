"""End-to-end Trainer runs of the finetuning_schedule plugin on a one-layer llama (CPU, fp32)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration.testing import build_framework
from fms_acceleration_fts import FinetuningSchedulePlugin, FTSTransitionError

LINEAR = [1.0, 0.75, 0.5, 0.25]  # linear decay factor at the start of epochs 0..3 (16 steps)


def expected_table(h):
    """Depth, thawed tensors, (phase, #tensors, wd) per group, initial lr per group, by epoch.

    lm_head decays, the norms do not; phase 1 has lr 2e-3, phase 2 none: base_max_lr 1e-5.
    """
    g0, g1, g2 = [(0, 1, 0.1), (0, 1, 0.0)], [(1, 3, 0.1), (1, 1, 0.0)], [(2, 4, 0.1), (2, 1, 0.0)]
    lr0, lr1, lr2 = [1e-3] * 2, [2e-3] * 2, [1e-5] * 2
    return [
        (0, h.PHASE0, g0, lr0),
        (1, h.PHASE0 + h.PHASE1, g0 + g1, lr0 + lr1),
        (2, h.NAMES[1:], g0 + g1 + g2, lr0 + lr1 + lr2),
        (2, h.NAMES[1:], g0 + g1 + g2, lr0 + lr1 + lr2),
    ]


def expected_lrs(initial: list[float], groups: list[tuple], epoch: int) -> list[float]:
    """FTS (apply_lambdas_new_pgs false): a group that joins at this epoch's start has its
    phase lr; the others follow the linear schedule."""
    return [
        lr if phase == epoch and epoch > 0 else lr * LINEAR[epoch]
        for lr, (phase, _, _) in zip(initial, groups)
    ]


class Snapshots(TrainerCallback):
    """Copies of every parameter at the start of each epoch."""

    def __init__(self):
        self.at_epoch: list[dict[str, torch.Tensor]] = []

    def on_epoch_begin(self, args, state, control, model=None, **kw):
        self.at_epoch.append({n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, h):
    """One uninterrupted 4-epoch run of the 3-phase schedule."""
    out = str(tmp_path_factory.mktemp("ref"))
    snaps = Snapshots()
    trainer, plugin, recorder = h.run_fts(
        out, {"ft_schedule": h.SCHEDULE, "early_stopping": {"patience": 5}}, extra_callbacks=[snaps]
    )
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return out, plugin, recorder, snaps, final


def test_expected_state_epoch_by_epoch(reference, h):
    _, plugin, recorder, _, _ = reference
    assert len(recorder.rows) == 4
    for row, (depth, thawed, groups, initial) in zip(recorder.rows, expected_table(h)):
        assert row["depth"] == depth, row
        assert row["thawed"] == set(thawed)
        assert row["groups"] == groups
        assert row["initial_lrs"] == pytest.approx(initial)
        assert row["lrs"] == pytest.approx(expected_lrs(initial, groups, row["epoch"]))
    transitions = plugin.callback.state.transitions
    assert [(t["depth"], t["global_step"]) for t in transitions] == [(1, 4), (2, 8)]


def test_later_phases_never_change_before_their_phase(reference, h):
    _, _, _, snaps, final = reference
    init = snaps.at_epoch[0]
    # embed_tokens is in no phase: never trained, never decayed
    assert torch.equal(final["model.embed_tokens.weight"], init["model.embed_tokens.weight"])
    for name in h.PHASE1:  # thawed at the end of epoch 1
        assert torch.equal(snaps.at_epoch[1][name], init[name]), name
        assert not torch.equal(final[name], init[name]), name
    for name in h.PHASE2:  # thawed at the end of epoch 2
        assert torch.equal(snaps.at_epoch[2][name], init[name]), name
        assert not torch.equal(final[name], init[name]), name
    for name in h.PHASE0:
        assert not torch.equal(snaps.at_epoch[1][name], init[name]), name


def test_checkpoints_carry_schedule_state(reference, h):
    out, _, _, _, _ = reference
    with open(os.path.join(out, "checkpoint-8", "fts_state.json")) as fh:
        state = json.load(fh)
    # saved at the end of epoch 1: phase 2 begins with the next epoch (as FTS, whose
    # transitions happen at the start of an epoch), so the checkpoint holds phase 1 + pending
    assert state["depth"] == 1 and state["n_phases"] == 3 and state["epochs_checked"] == 2
    assert state["pending"] == "max_transition_epoch 2 reached"
    assert [t["global_step"] for t in state["transitions"]] == [4]
    opt = torch.load(os.path.join(out, "checkpoint-8", "optimizer.pt"), weights_only=True)
    assert [g["fts_phase"] for g in opt["param_groups"]] == [0, 0, 1, 1]
    opt = torch.load(os.path.join(out, "checkpoint-12", "optimizer.pt"), weights_only=True)
    assert [g["fts_phase"] for g in opt["param_groups"]] == [0, 0, 1, 1, 2, 2]


def _resume_and_compare(h, tmp_path, reference, ckpt: str, dest_name: str | None = None, **kw):
    out, _, _, _, final = reference
    run_dir = tmp_path / "resumed"
    dest = run_dir / (dest_name or ckpt)
    shutil.copytree(os.path.join(out, ckpt), dest)
    trainer, plugin, recorder = h.run_fts(
        str(run_dir),
        {"ft_schedule": h.SCHEDULE, "early_stopping": {"patience": 5}},
        resume=str(dest),
    )
    diff = max(
        (p.detach() - final[n]).abs().max().item() for n, p in trainer.model.named_parameters()
    )
    assert diff <= 1e-5, (ckpt, diff)
    assert plugin.callback.depth == 2 and trainer.state.global_step == 16
    return plugin, recorder


@pytest.mark.parametrize("ckpt", ["checkpoint-4", "checkpoint-8", "checkpoint-12"])
def test_resume_matches_uninterrupted_run(tmp_path, reference, ckpt, h):
    plugin, recorder = _resume_and_compare(h, tmp_path, reference, ckpt)
    assert [t["global_step"] for t in plugin.callback.state.transitions] == [4, 8]
    first = recorder.rows[0]
    assert first["groups"] == expected_table(h)[first["epoch"]][2]


def test_resume_from_renamed_checkpoint_uses_state_in_optimizer(tmp_path, reference, h):
    # no checkpoint-8/fts_state.json under output_dir: the copy kept in optimizer.pt is used
    plugin, _ = _resume_and_compare(h, tmp_path, reference, "checkpoint-8", dest_name="snapshot")
    assert plugin.callback.state.epochs_checked == 4


@pytest.mark.parametrize(
    "save_steps,ckpts,depths",
    [
        (3, ("checkpoint-6", "checkpoint-9"), (1, 2)),  # mid epochs 1 and 2
        # saved at the last step of epochs 0 and 1, before on_epoch_end made the transition
        (4, ("checkpoint-4", "checkpoint-8"), (0, 1)),  # each with its transition pending
    ],
)
def test_resume_from_step_checkpoints(tmp_path, schedule, h, save_steps, ckpts, depths):
    stanza = {"ft_schedule": schedule, "early_stopping": {"patience": 5}}
    ref_dir = tmp_path / "ref"
    args = h.train_args(str(ref_dir), save_strategy="steps", save_steps=save_steps)
    trainer, _, _ = h.run_fts(str(ref_dir), stanza, args=args)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for ckpt, depth in zip(ckpts, depths):
        saved = json.loads((ref_dir / ckpt / "fts_state.json").read_text())
        assert saved["depth"] == depth
        run_dir = tmp_path / f"resume-{ckpt}"
        shutil.copytree(ref_dir / ckpt, run_dir / ckpt)
        args = h.train_args(str(run_dir), save_strategy="steps", save_steps=save_steps)
        trainer2, plugin2, _ = h.run_fts(
            str(run_dir), stanza, args=args, resume=str(run_dir / ckpt)
        )
        assert [t["global_step"] for t in plugin2.callback.state.transitions] == [4, 8]
        if h.resumes_exactly(int(ckpt.split("-")[1])):
            diff = max(
                (p - final[n]).abs().max().item() for n, p in trainer2.model.named_parameters()
            )
            assert diff <= 1e-5, (ckpt, diff)


def test_default_schedule_written_and_early_stopping_drives_transitions(tmp_path, h):
    # patience 1 and an unreachable min_delta: after the first evaluation (the best of the run),
    # every evaluation ends a phase, because the best score is kept across phases (FTS)
    stanza = {"early_stopping": {"patience": 1, "min_delta": 10.0}, "max_depth": 2}
    args = h.train_args(str(tmp_path), eval_strategy="steps", eval_steps=2, save_strategy="no")
    trainer, plugin, _ = h.run_fts(str(tmp_path), stanza, args=args)
    path = tmp_path / "LlamaForCausalLM_ft_schedule.yaml"
    written = yaml.safe_load(path.read_text())
    assert written == {i: {"params": list(reversed(h.NAMES))[2 * i : 2 * i + 2]} for i in range(6)}
    cb = plugin.callback
    assert cb.final_depth == 2
    assert [(t["depth"], t["global_step"], t["reason"]) for t in cb.state.transitions] == [
        (1, 4, "early stopping"),
        (2, 6, "early stopping"),
    ]
    # in the final phase early stopping ends training at its first evaluation (step 8)
    assert trainer.state.global_step == 8
    assert cb.state.stopped.startswith("eval_loss did not improve in the last 1 evaluations")
    assert set(cb.thawed_names()) == set(list(reversed(h.NAMES))[:6])


def test_max_transition_step_and_early_stopping_whichever_first(tmp_path, schedule, h):
    schedule[0] = {"params": h.PHASE0, "max_transition_step": 3}
    schedule[1] = {"params": h.PHASE1, "max_transition_step": 100}
    stanza = {"ft_schedule": schedule, "early_stopping": {"patience": 1, "min_delta": 10.0}}
    args = h.train_args(str(tmp_path), eval_strategy="steps", eval_steps=4, save_strategy="no")
    trainer, plugin, _ = h.run_fts(str(tmp_path), stanza, args=args)
    # phase 0 ends by step (3) before its first eval; phase 1 by early stopping (evals 4, 8)
    assert [(t["global_step"], t["reason"]) for t in plugin.callback.state.transitions] == [
        (3, "max_transition_step 3 reached"),
        (8, "early stopping"),
    ]
    # the final phase's first evaluation (12) is no better than the run's best: stop
    assert trainer.state.global_step == 12


def test_epoch_transitions_only_ignores_early_stopping(tmp_path, schedule, h):
    stanza = {
        "ft_schedule": schedule,
        "epoch_transitions_only": True,
        "early_stopping": {"patience": 1, "min_delta": 10.0},
    }
    trainer, plugin, recorder = h.run_fts(str(tmp_path), stanza)
    assert [t["global_step"] for t in plugin.callback.state.transitions] == [4, 8]
    assert trainer.state.global_step == 16
    assert [r["depth"] for r in recorder.rows] == [0, 1, 2, 2]


def test_max_depth_stops_thawing(tmp_path, schedule, h):
    trainer, _, recorder = h.run_fts(str(tmp_path), {"ft_schedule": schedule, "max_depth": 1})
    assert [r["depth"] for r in recorder.rows] == [0, 1, 1, 1]
    init = h.tiny_model().state_dict()
    for name in h.PHASE2:
        assert torch.equal(trainer.model.state_dict()[name], init[name]), name


class OptimizerSnapshots(TrainerCallback):
    """Copies of the optimizer's per-parameter state (by parameter name) at each epoch start."""

    def __init__(self, model):
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.at_epoch: list[dict[str, dict]] = []
        self.at_end: list[dict[str, dict]] = []

    def _copy(self, optimizer) -> dict[str, dict]:
        raw = optimizer.optimizer
        return {
            self.names[id(p)]: {k: v.clone() for k, v in raw.state[p].items()}
            for g in raw.param_groups
            for p in g["params"]
            if p in raw.state
        }

    def on_epoch_begin(self, args, state, control, optimizer=None, **kw):
        self.at_epoch.append(self._copy(optimizer))

    def on_epoch_end(self, args, state, control, optimizer=None, **kw):
        self.at_end.append(self._copy(optimizer))


def test_restore_best_loads_best_weights_and_optimizer_state(tmp_path, schedule, h):
    snaps = Snapshots()
    model = h.tiny_model()
    opt_snaps = OptimizerSnapshots(model)
    # the evaluation after epoch 0 stays the best: every transition restores checkpoint-4
    trainer, plugin, _ = h.run_fts(
        str(tmp_path),
        {"ft_schedule": schedule, "restore_best": True, "early_stopping": {"patience": 5}},
        model=model,
        first_callbacks=[h.MetricSequence([1.0, 2.0, 3.0, 4.0])],
        extra_callbacks=[snaps, opt_snaps],
    )
    assert plugin.callback.state.best_checkpoint == str(tmp_path / "checkpoint-4")
    best = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    for name, value in snaps.at_epoch[2].items():
        assert torch.equal(value, best[name]), name
    # phase 1 trained during epoch 1, but checkpoint-4 predates that: back to initial values
    for name in h.PHASE1:
        assert torch.equal(snaps.at_epoch[2][name], snaps.at_epoch[0][name]), name
        assert not torch.equal(snaps.at_epoch[3][name], snaps.at_epoch[0][name]), name
    # the optimizer state of checkpoint-4's groups (phase 0) is restored too (FTS restores the
    # best checkpoint's optimizer state); groups that joined later start fresh
    saved = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert [g["fts_phase"] for g in saved["param_groups"]] == [0, 0]
    flat = [p for g in trainer.optimizer.optimizer.param_groups for p in g["params"]]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for index, state in saved["state"].items():
        name = names[id(flat[index])]
        assert name in h.PHASE0
        assert torch.equal(opt_snaps.at_epoch[2][name]["exp_avg"], state["exp_avg"]), name
        assert not torch.equal(opt_snaps.at_end[1][name]["exp_avg"], state["exp_avg"]), name
    assert not any(n in opt_snaps.at_epoch[2] for n in h.PHASE1 + h.PHASE2)


def test_reinitialize_optimizer_and_scheduler(tmp_path, schedule, h):
    schedule[1]["new_optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    schedule[1]["new_lr_scheduler"] = {
        "lr_scheduler_init": {
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 2, "gamma": 0.5},
        }
    }
    schedule[1].pop("lr")
    seen = []

    class Peek(TrainerCallback):
        def on_epoch_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            seen.append((type(optimizer.optimizer).__name__, type(lr_scheduler).__name__))

    _, _, recorder = h.run_fts(str(tmp_path), {"ft_schedule": schedule}, extra_callbacks=[Peek()])
    assert seen == [("AdamW", "LambdaLR"), ("SGD", "StepLR"), ("SGD", "StepLR"), ("SGD", "StepLR")]
    # epoch 1: the new SGD's phase-0 groups have initial_lr 0.05 and the new scheduler starts
    # existing groups there (FTS); phase 1 (no lr of its own) joins at base_max_lr
    assert recorder.rows[1]["initial_lrs"] == pytest.approx([0.05, 0.05, 1e-5, 1e-5])
    assert recorder.rows[1]["lrs"] == pytest.approx([0.05, 0.05, 1e-5, 1e-5])
    # StepLR(step_size=2) steps once per epoch (Lightning's default interval, FTS's): unchanged
    # after one epoch; phase 2 joins at base_max_lr
    assert recorder.rows[2]["lrs"] == pytest.approx([0.05, 0.05, 1e-5, 1e-5, 1e-5, 1e-5])
    assert recorder.rows[3]["lrs"] == pytest.approx([0.025, 0.025, 5e-6, 5e-6, 5e-6, 5e-6])
    # resuming past a scheduler reinitialization is refused with a clear message
    run_dir = tmp_path / "resume"
    shutil.copytree(tmp_path / "checkpoint-12", run_dir / "checkpoint-12")
    with pytest.raises(FTSTransitionError, match=r"cannot resume past phase 1: it reinitializes"):
        h.run_fts(str(run_dir), {"ft_schedule": schedule}, resume=str(run_dir / "checkpoint-12"))


def test_resume_past_optimizer_reinitialization(tmp_path, schedule, h):
    schedule[2]["new_optimizer"] = {
        "class_path": "torch.optim.SGD",
        "init_args": {"momentum": 0.9, "lr": 0.01},
    }
    stanza = {"ft_schedule": schedule, "early_stopping": {"patience": 5}}
    trainer, _, _ = h.run_fts(str(tmp_path / "ref"), stanza)
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_dir = tmp_path / "resume"
    shutil.copytree(tmp_path / "ref" / "checkpoint-12", run_dir / "checkpoint-12")
    trainer2, _, _ = h.run_fts(str(run_dir), stanza, resume=str(run_dir / "checkpoint-12"))
    assert type(trainer2.optimizer.optimizer).__name__ == "SGD"
    diff = max((p - final[n]).abs().max().item() for n, p in trainer2.model.named_parameters())
    assert diff <= 1e-5


def test_plugin_config_errors_name_the_path(tmp_path, schedule, h):
    bad = {0: {"params": ["lm_head.wieght"]}}
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": bad}}}},
        [FinetuningSchedulePlugin],
    )
    with pytest.raises(
        AccelerationPluginConfigError,
        match=r"plugins\.training\.finetuning_schedule\.ft_schedule: phase 0: params entry "
        r"'lm_head.wieght' matches no parameter",
    ):
        framework.augmentation(h.tiny_model(), h.train_args(str(tmp_path)), modifiable_args=())
    with pytest.raises(AccelerationPluginConfigError, match=r"early_stopping\.patince"):
        build_framework(
            {"plugins": {"training": {"finetuning_schedule": {"early_stopping": {"patince": 2}}}}},
            [FinetuningSchedulePlugin],
        )
    # adapter options are checked when the framework is built (fms-acceleration check)
    with pytest.raises(
        AccelerationPluginConfigError,
        match=r"plugins\.training\.finetuning_schedule\.strategy_adapter_cfg\.phase_sise: unknown "
        r"key 'phase_sise' \(did you mean 'phase_size'\?\)",
    ):
        build_framework(
            {
                "plugins": {
                    "training": {"finetuning_schedule": {"strategy_adapter_cfg": {"phase_sise": 3}}}
                }
            },
            [FinetuningSchedulePlugin],
        )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(schedule))
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": str(path)}}}},
        [FinetuningSchedulePlugin],
    )
    model, _ = framework.augmentation(
        h.tiny_model(), h.train_args(str(tmp_path)), modifiable_args=()
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.norm.weight",
        "lm_head.weight",
    ]
    assert framework.plugins["finetuning_schedule"].taken_slots() == frozenset({"param_freezing"})


def test_resume_keeps_early_stopping_state(tmp_path, h):
    stanza = {"early_stopping": {"patience": 2, "min_delta": 10.0}, "max_depth": 2}

    def args(d):
        return h.train_args(str(d), eval_strategy="steps", eval_steps=2, save_strategy="steps",
                            save_steps=2)  # fmt: skip

    trainer, plugin, _ = h.run_fts(str(tmp_path / "ref"), stanza, args=args(tmp_path / "ref"))
    # patience 2: phase 0 lasts three evaluations, later phases two (the best of the run is
    # the first evaluation); the final phase stops training at its second evaluation
    assert [t["global_step"] for t in plugin.callback.state.transitions] == [6, 10]
    assert trainer.state.global_step == 14
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    saved = json.loads((tmp_path / "ref" / "checkpoint-10" / "fts_state.json").read_text())
    assert (saved["depth"], saved["pending"], saved["wait"]) == (1, "early stopping", 0)
    # checkpoint-4: one evaluation without improvement; checkpoint-10: a transition pending
    for ckpt in ("checkpoint-4", "checkpoint-10"):
        run_dir = tmp_path / ckpt
        shutil.copytree(tmp_path / "ref" / ckpt, run_dir / ckpt)
        trainer2, plugin2, _ = h.run_fts(
            str(run_dir), stanza, args=args(run_dir), resume=str(run_dir / ckpt)
        )
        assert [t["global_step"] for t in plugin2.callback.state.transitions] == [6, 10]
        assert trainer2.state.global_step == 14
        if h.resumes_exactly(int(ckpt.split("-")[1])):
            diff = max(
                (p - final[n]).abs().max().item() for n, p in trainer2.model.named_parameters()
            )
            assert diff <= 1e-5, (ckpt, diff)

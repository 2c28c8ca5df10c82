"""Shared fixtures: a tiny llama, a 3-phase schedule for it, and a Trainer runner."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the parity tests' helper module is imported by name (and named in schedules' class_path);
# pytest's importlib mode does not put test folders on sys.path
if os.path.dirname(__file__) not in sys.path:
    sys.path.append(os.path.dirname(__file__))
torch.set_num_threads(1)

# A one-layer llama keeps the runs quick: 12 tensors.
TINY = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64)

# Names of the tiny model, in model order.
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]

PHASE0 = ["lm_head.weight", "model.norm.weight"]
PHASE1 = [n for n in NAMES if n.startswith("model.layers.0.mlp") or "post_attention" in n]
PHASE2 = [n for n in NAMES if n.startswith("model.layers.0.self_attn") or "input_layernorm" in n]
# embed_tokens is in no phase: it must stay frozen and out of the optimizer.

SCHEDULE = {
    0: {"params": PHASE0, "max_transition_epoch": 1},
    1: {
        "params": [r"model\.layers\.0\.mlp\..*", "model.layers.0.post_attention_layernorm.weight"],
        "max_transition_epoch": 2,
        "lr": 2.0e-3,
    },
    2: {"params": [r"model\.layers\.0\.(self_attn|input_layernorm)"]},
}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A fresh seeded one-layer llama (fp32, CPU)."""
    from fms_acceleration.testing import tiny_model_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config("llama", **TINY))


def train_args(out: str, **overrides: Any) -> TrainingArguments:
    """Deterministic CPU TrainingArguments: 4 steps per epoch on 16 rows."""
    kwargs = dict(
        output_dir=out,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        num_train_epochs=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class Recorder(TrainerCallback):
    """Records depth, thawed tensors and param groups at the start of every epoch."""

    def __init__(self, fts) -> None:
        self.fts = fts
        self.rows: list[dict[str, Any]] = []

    def on_epoch_begin(self, args, state, control, optimizer=None, **kw):
        self.rows.append(
            {
                "epoch": round(state.epoch or 0.0),
                "depth": self.fts.depth,
                "thawed": set(self.fts.thawed_names()),
                "groups": [
                    (g["fts_phase"], len(g["params"]), g["weight_decay"])
                    for g in optimizer.param_groups
                ],
                "initial_lrs": [g["initial_lr"] for g in optimizer.param_groups],
                "lrs": [g["lr"] for g in optimizer.param_groups],
            }
        )


def run_fts(
    tmp: str,
    stanza: dict[str, Any],
    model: torch.nn.Module | None = None,
    args: TrainingArguments | None = None,
    n_train: int = 16,
    resume: str | bool | None = None,
    extra_callbacks: list[TrainerCallback] | None = None,
    before_train: Callable[[Trainer], None] | None = None,
    first_callbacks: list[TrainerCallback] | None = None,
):
    """Build framework + Trainer for the FTS stanza, train, return (trainer, plugin, recorder)."""
    from fms_acceleration.testing import build_framework, tiny_dataset
    from fms_acceleration_fts import FinetuningSchedulePlugin

    model = tiny_model() if model is None else model
    args = train_args(tmp) if args is None else args
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": stanza}}}, [FinetuningSchedulePlugin]
    )
    model, _ = framework.augmentation(model, args, modifiable_args=())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(n=n_train, seq_len=8, vocab=128, seed=0),
        eval_dataset=tiny_dataset(n=8, seq_len=8, vocab=128, seed=1),
        callbacks=first_callbacks,
    )
    plugin = framework.plugins["finetuning_schedule"]
    for cb in framework.get_callbacks_and_ready_for_train(
        model, trainer.accelerator, trainer=trainer
    ):
        trainer.add_callback(cb)
    recorder = Recorder(plugin.callback)
    trainer.add_callback(recorder)
    for cb in extra_callbacks or []:
        trainer.add_callback(cb)
    if before_train is not None:
        before_train(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, plugin, recorder


class MetricSequence(TrainerCallback):
    """Replaces the monitored metric of the k-th evaluation by values[k] (a scripted run).

    Added before the FTS callback (Trainer(callbacks=...)), so FTS and the Trainer's own
    ReduceLROnPlateau step see the scripted value.
    """

    def __init__(self, values: list[float], key: str = "eval_loss") -> None:
        self.values = list(values)
        self.key = key
        self.calls = 0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics[self.key] = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1


@pytest.fixture
def schedule() -> dict:
    """A fresh copy of the 3-phase schedule of the tiny model."""
    return {k: dict(v) for k, v in SCHEDULE.items()}


def torchrun(script: str, *args: str, timeout: int = 300) -> None:
    """Run a test script under torchrun with 2 processes (CPU, gloo); fail with its stderr."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    path = os.path.join(os.path.dirname(__file__), script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           path, *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def resumes_exactly(global_step: int, steps_per_epoch: int = 4) -> bool:
    """Whether the Trainer resumed at `global_step` repeats the uninterrupted run bit for bit.

    transformers 4.55's Trainer does not when it resumes mid-epoch, with or without this plugin:
    a plain Trainer run of the tiny model resumed from checkpoint-6 (of 4 steps per epoch) ends
    ~2e-3 away from the run that was not interrupted; 5.x repeats it exactly. Where it does not,
    the tests check the schedule state and leave the weights alone.
    """
    from fms_acceleration.compat import at_least

    return global_step % steps_per_epoch == 0 or at_least("transformers", "5.0")


class Helpers:
    """Constants and runners of this conftest, for test modules (which cannot import it)."""

    NAMES = NAMES
    PHASE0 = PHASE0
    PHASE1 = PHASE1
    PHASE2 = PHASE2
    SCHEDULE = SCHEDULE
    Recorder = Recorder
    torchrun = staticmethod(torchrun)
    MetricSequence = MetricSequence
    run_fts = staticmethod(run_fts)
    resumes_exactly = staticmethod(resumes_exactly)
    tiny_model = staticmethod(tiny_model)
    train_args = staticmethod(train_args)


@pytest.fixture(scope="session")
def h() -> type[Helpers]:
    """The helpers of this conftest."""
    return Helpers

"""Checks before loading (model folder, output folder, checkpoint) and Ctrl-C during training."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from fms_acceleration.testing import tiny_dataset
from fms_acceleration_train.errors import TrainJobError
from fms_acceleration_train.interrupt import TrainingInterrupted, checkpoint_on_interrupt
from fms_acceleration_train.preflight import (
    check_checkpoint,
    check_model_dir,
    check_output_dir,
)


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


MODEL_DAMAGE = {
    "corrupt config.json": (
        lambda m: (m / "config.json").write_text('{"model_type": "llama",'),
        "config.json: the model config (config.json) is not valid JSON (line 1",
    ),
    "config.json not UTF-8": (
        lambda m: (m / "config.json").write_bytes(b'{"model_type": "caf\xe9"}'),
        "config.json: the model config (config.json) is not UTF-8 text",
    ),
    "config.json is a list": (
        lambda m: (m / "config.json").write_text("[1, 2]"),
        "must hold a JSON object, not list",
    ),
    "unknown architecture": (
        lambda m: (m / "config.json").write_text('{"model_type": "llama9000"}'),
        "model_type 'llama9000' is not an architecture this transformers version knows",
    ),
    "missing weights": (
        lambda m: (m / "model.safetensors").unlink(),
        "no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
    ),
    "truncated weights": (
        lambda m: _truncate(m / "model.safetensors", 20_000),
        "model.safetensors: truncated (20000 of",
    ),
    "weights cut inside the header": (
        lambda m: _truncate(m / "model.safetensors", 40),
        "model.safetensors: truncated (the header alone needs",
    ),
    "weights shorter than a header": (
        lambda m: _truncate(m / "model.safetensors", 5),
        "model.safetensors: truncated (5 bytes)",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_damaged_model_folder_is_named(case, model_copy):
    damage, message = MODEL_DAMAGE[case]
    damage(model_copy)
    with pytest.raises(TrainJobError) as info:
        check_model_dir(model_copy)
    assert message in str(info.value)


def test_intact_model_folder_passes(tiny_model):
    check_model_dir(tiny_model)


def test_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False, resuming=False)
    check_output_dir(tmp_path, overwrite=False, resuming=False)  # empty folder
    (tmp_path / "train_summary.json").write_text("{}")
    with pytest.raises(TrainJobError, match="is not empty .* pass --overwrite"):
        check_output_dir(tmp_path, overwrite=False, resuming=False)
    check_output_dir(tmp_path, overwrite=True, resuming=False)
    check_output_dir(tmp_path, overwrite=False, resuming=True)
    with pytest.raises(TrainJobError, match="is a file; give a folder"):
        check_output_dir(tmp_path / "train_summary.json", overwrite=True, resuming=False)
    under_a_file = tmp_path / "train_summary.json" / "a" / "b"
    for resuming in (False, True):  # even a resumed or overwriting run cannot write there
        with pytest.raises(TrainJobError) as err:
            check_output_dir(under_a_file, overwrite=True, resuming=resuming)
        assert str(err.value) == (
            f"--output-dir {under_a_file}: is under {tmp_path / 'train_summary.json'}, which is a "
            "file; give a folder"
        )
    check_output_dir(tmp_path / "new" / "deeper", overwrite=False, resuming=False)


def _train_with_interrupt(model_dir, output_dir, interrupt_at):
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    class SendInterrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for _ in range(interrupt_at.get(state.global_step, 0)):
                os.kill(os.getpid(), signal.SIGINT)

    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=tiny_dataset(n=24, seq_len=8),
        data_collator=default_data_collator,
    )
    with checkpoint_on_interrupt() as interrupt:
        trainer.add_callback(interrupt)
        trainer.add_callback(SendInterrupt())
        trainer.train()
    return trainer, interrupt


def test_first_ctrl_c_saves_a_checkpoint_and_stops(tiny_model, tmp_path):
    # a handler of the test's own before training: the one there must be put back. (What a
    # process starts with varies: a job started in the background by a shell ignores SIGINT.)
    def before(signum, frame):
        raise AssertionError("the test's own handler must not be called")

    outer = signal.signal(signal.SIGINT, before)
    try:
        trainer, interrupt = _train_with_interrupt(
            tiny_model, tmp_path / "out", interrupt_at={2: 1}
        )
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, outer)
    assert trainer.state.global_step == 3  # the step that was running finished
    assert interrupt.saved == tmp_path / "out" / "checkpoint-3"
    state = json.loads((interrupt.saved / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    check_checkpoint(interrupt.saved, allow_partial=False)
    assert interrupt.outcome(6) == (
        f"interrupted at step 3 of 6: checkpoint saved to {interrupt.saved}; continue with "
        f"--resume-from-checkpoint {interrupt.saved}"
    )


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_model, tmp_path):
    with pytest.raises(TrainingInterrupted, match="^interrupted: no checkpoint was saved$"):
        _train_with_interrupt(tiny_model, tmp_path / "out", interrupt_at={1: 2})
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    _, interrupt = _train_with_interrupt(tiny_model, out, interrupt_at={1: 1})
    return interrupt.saved


CHECKPOINT_DAMAGE = {
    "missing optimizer.pt": (
        lambda c: (c / "optimizer.pt").unlink(),
        "optimizer.pt missing; resuming would restart the optimizer",
    ),
    "missing scheduler.pt and trainer_state.json": (
        lambda c: [(c / n).unlink() for n in ("scheduler.pt", "trainer_state.json")],
        "scheduler.pt, trainer_state.json missing",
    ),
    "truncated optimizer.pt": (
        lambda c: _truncate(c / "optimizer.pt", 200),
        "optimizer.pt: damaged or truncated",
    ),
    "truncated scheduler.pt": (
        lambda c: _truncate(c / "scheduler.pt", 10),
        "scheduler.pt: damaged or truncated",
    ),
    "corrupt trainer_state.json": (
        lambda c: _truncate(c / "trainer_state.json", 30),
        "trainer_state.json: the trainer state is not valid JSON",
    ),
    "trainer_state.json without a step": (
        lambda c: (c / "trainer_state.json").write_text("{}"),
        "trainer_state.json: has no global_step",
    ),
    "truncated weights": (
        lambda c: _truncate(c / "model.safetensors", 1000),
        "model.safetensors: truncated",
    ),
    "no weights": (
        lambda c: (c / "model.safetensors").unlink(),
        "has no weights; it cannot be resumed",
    ),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_named(case, checkpoint, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    damage, message = CHECKPOINT_DAMAGE[case]
    damage(copy)
    with pytest.raises(TrainJobError) as info:
        check_checkpoint(copy, allow_partial=False)
    assert message in str(info.value)


def test_partial_resume_only_when_asked(checkpoint, tmp_path):
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    (copy / "optimizer.pt").unlink()
    check_checkpoint(copy, allow_partial=True)


def test_runs_without_an_output_dir_get_folders_of_their_own(tmp_path, monkeypatch):
    from fms_acceleration_train.preflight import RUNS_DIR, resolve_output_dir

    monkeypatch.chdir(tmp_path)
    assert resolve_output_dir("mine", None) == Path("mine")
    with pytest.raises(TrainJobError, match="no earlier run under outputs/train"):
        resolve_output_dir(None, "last")
    first = resolve_output_dir(None, None)
    assert first.parent == RUNS_DIR and first.name.startswith("run-")
    first.mkdir(parents=True)
    second = resolve_output_dir(None, None)  # same second: a suffix, never the earlier run
    assert second != first and second.parent == RUNS_DIR
    second.mkdir()
    assert resolve_output_dir(None, "last") == max(first, second)

"""Batch hooks and stop requests of plugins on a real transformers.Trainer (tiny Llama, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from fms_acceleration import AccelerationFrameworkError, AccelerationPlugin, StanzaModel
from fms_acceleration.compat import dtype_kwargs, trainer_counts_shifted_labels
from fms_acceleration.errors import AccelerationPluginConfigError, PluginCombinationError
from fms_acceleration.framework_plugin import TRAINING_BATCH_SLOT, VALIDATION_BATCH_SLOT
from fms_acceleration.testing import build_framework, tiny_dataset


class NoOptions(StanzaModel):
    pass


def _register(cls: type, stanza: str) -> type:
    AccelerationPlugin.register_plugin(
        cls, configuration_and_paths=[f"training.{stanza}"], plugin_id=stanza,
        schemas={f"training.{stanza}": NoOptions},
    )  # fmt: skip
    return cls


def _config(*stanzas: str) -> dict:
    return {"plugins": {"training": {s: {} for s in stanzas}}}


class KeepEvenStarts(AccelerationPlugin):
    """Drops the rows whose first token is odd (a different count in every batch)."""

    slots = frozenset({TRAINING_BATCH_SLOT})

    def __init__(self, configurations):
        super().__init__(configurations)
        self.seen: list[tuple[int, int, int]] = []  # (global_step, rows in, rows out)

    def process_training_batch(self, batch, state):
        keep = batch["input_ids"][:, 0] % 2 == 0
        keep[0] = True  # never an empty batch
        out = {k: v[keep] for k, v in batch.items()}
        self.seen.append((state.global_step, len(keep), int(keep.sum())))
        return out


class TruncateEvalLabels(AccelerationPlugin):
    """Masks the second half of each evaluation row's labels, recording the batch index."""

    slots = frozenset({VALIDATION_BATCH_SLOT})

    def __init__(self, configurations):
        super().__init__(configurations)
        self.steps: list[int] = []

    def process_validation_batch(self, batch, step):
        self.steps.append(step)
        labels = batch["labels"].clone()
        labels[:, labels.shape[1] // 2 :] = -100
        return {**batch, "labels": labels}


class StopAtStep(AccelerationPlugin):
    def __init__(self, configurations):
        super().__init__(configurations)
        self.asked: list[int] = []

    def should_training_stop(self, state):
        self.asked.append(state.global_step)
        return state.global_step >= 3


class NeverStop(AccelerationPlugin):
    def __init__(self, configurations):
        super().__init__(configurations)
        self.asked = 0

    def should_training_stop(self, state):
        self.asked += 1
        return False


class StopAfterFirstEval(AccelerationPlugin):
    def should_training_stop(self, state):
        return any("eval_loss" in entry for entry in state.log_history)


class UndeclaredTraining(AccelerationPlugin):
    def process_training_batch(self, batch, state):
        return batch


class UndeclaredValidation(AccelerationPlugin):
    def process_validation_batch(self, batch, step):
        return batch


class SecondTrainingHook(KeepEvenStarts):
    pass


class ReturnsNothing(AccelerationPlugin):
    slots = frozenset({TRAINING_BATCH_SLOT})

    def process_training_batch(self, batch, state):
        return None


class StopAtTwo(TrainerCallback):
    """What the fine-tuning schedule's early stopping does: set the flag itself."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True


@pytest.fixture(autouse=True)
def _plugins():
    for cls, stanza in (
        (KeepEvenStarts, "keep_even"), (TruncateEvalLabels, "truncate_eval"),
        (StopAtStep, "stop_at_step"), (NeverStop, "never_stop"),
        (StopAfterFirstEval, "stop_after_eval"), (UndeclaredTraining, "undeclared_training"),
        (UndeclaredValidation, "undeclared_validation"), (SecondTrainingHook, "second_hook"),
        (ReturnsNothing, "returns_nothing"),
    ):  # fmt: skip
        _register(cls, stanza)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, data_seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def _trainer(tmp_path, model_dir, framework, **kw) -> Trainer:
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=tiny_dataset(n=32, seq_len=12, seed=1),
        eval_dataset=tiny_dataset(n=6, seq_len=12, seed=2),
        data_collator=default_data_collator,
    )
    if framework is not None:
        for cb in framework.get_callbacks_and_ready_for_train(
            model, trainer.accelerator, trainer=trainer
        ):
            trainer.add_callback(cb)
    return trainer


def _reference_loss(model, batches, training: bool = True) -> float:
    """Causal-LM cross entropy summed over all the batches together, divided by the count the
    Trainer normalises by: scored tokens (in training before transformers 5.11, every label; an
    evaluation batch is the model's own mean over its scored tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )  # fmt: skip
            total += losses.item()
            shifted = trainer_counts_shifted_labels() or not training
            counted = labels if shifted else batch["labels"]
            count += int((counted != -100).sum())
    return total / count


# --- declarations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "stanza", "hook", "slot"),
    [
        (UndeclaredTraining, "undeclared_training", "process_training_batch", "training_batch"),
        (UndeclaredValidation, "undeclared_validation", "process_validation_batch",
         "validation_batch"),
    ],
)  # fmt: skip
def test_overriding_a_batch_hook_without_its_slot_fails_at_construction(plugin, stanza, hook, slot):
    with pytest.raises(AccelerationPluginConfigError) as err:
        build_framework(_config(stanza), [plugin])
    assert str(err.value) == (
        f"<dict configuration>: plugin '{stanza}' ({plugin.__name__}) overrides {hook} but "
        f"does not declare the slot '{slot}': add it to the class attribute `slots` (only one "
        "active plugin may process these batches)."
    )


def test_two_training_batch_hooks_are_refused():
    with pytest.raises(PluginCombinationError, match="slot 'training_batch'"):
        build_framework(_config("keep_even", "second_hook"), [KeepEvenStarts, SecondTrainingHook])


def test_stop_requests_are_not_exclusive():
    framework = build_framework(_config("stop_at_step", "never_stop"), [StopAtStep, NeverStop])
    assert dict(framework.slot_owners) == {}


def test_batch_hook_needs_the_trainer(tiny_llama_dir):
    framework = build_framework(_config("keep_even"), [KeepEvenStarts])
    with pytest.raises(AccelerationFrameworkError) as err:
        framework.get_callbacks_and_ready_for_train()
    assert str(err.value) == (
        "plugin 'keep_even' processes batches (slot 'training_batch'): pass the Trainer, "
        "get_callbacks_and_ready_for_train(model, trainer.accelerator, trainer=trainer)"
    )


# --- training batches --------------------------------------------------------------------------


def test_training_hook_drops_rows_and_the_loss_counts_only_kept_tokens(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("keep_even"), [KeepEvenStarts])
    trainer = _trainer(
        tmp_path, tiny_llama_dir, framework, max_steps=2, gradient_accumulation_steps=2
    )
    plugin = framework.plugins["keep_even"]
    recorded: list[tuple[dict, object]] = []
    original_step = trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        recorded.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return original_step(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, **dtype_kwargs(torch.float32))
    trainer.train()

    # 2 steps x 2 micro-batches of 4 rows; every batch lost its odd-start rows
    assert [s[0] for s in plugin.seen] == [0, 0, 1, 1]
    assert all(rows_in == 4 for _, rows_in, _ in plugin.seen)
    kept = [rows_out for _, _, rows_out in plugin.seen]
    assert [len(b["input_ids"]) for b, _ in recorded] == kept
    assert sum(kept) < 16  # the hook really dropped rows in this data
    assert all(bool((b["input_ids"][1:, 0] % 2 == 0).all()) for b, _ in recorded)
    # the Trainer's own count over the kept rows: scored (shifted) labels, or all on 4.x
    scored = 11 if trainer_counts_shifted_labels() else 12
    for first, second in (recorded[0:2], recorded[2:4]):
        rows = first[0]["labels"].shape[0] + second[0]["labels"].shape[0]
        assert int(first[1]) == int(second[1]) == scored * rows
    # the first step's logged loss is the token mean over the kept rows (plain-PyTorch reference)
    reference = _reference_loss(initial, [recorded[0][0], recorded[1][0]])
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(reference, rel=1e-4)


def test_undo_patches_removes_the_batch_hook(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("keep_even"), [KeepEvenStarts])
    trainer = _trainer(tmp_path, tiny_llama_dir, framework, max_steps=1)
    assert "get_batch_samples" in trainer.__dict__
    assert "training-batch-hook" in framework.summary()
    framework.undo_patches()
    assert "get_batch_samples" not in trainer.__dict__
    trainer.train()
    assert framework.plugins["keep_even"].seen == []


def test_a_hook_returning_none_is_named(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("returns_nothing"), [ReturnsNothing])
    trainer = _trainer(tmp_path, tiny_llama_dir, framework, max_steps=1)
    with pytest.raises(AccelerationFrameworkError) as err:
        trainer.train()
    assert str(err.value) == (
        "plugin 'returns_nothing': process_training_batch returned None; it must return the batch"
    )


# --- validation batches ------------------------------------------------------------------------


def test_validation_hook_sees_each_batch_with_its_index(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("truncate_eval"), [TruncateEvalLabels])
    trainer = _trainer(tmp_path, tiny_llama_dir, framework, per_device_eval_batch_size=2)
    assert "prediction_step" in trainer.__dict__
    plugin = framework.plugins["truncate_eval"]
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert plugin.steps == [0, 1, 2, 0, 1, 2]  # 6 rows in batches of 2, index reset per run
    assert first["eval_loss"] == pytest.approx(second["eval_loss"], rel=1e-6)
    rows = tiny_dataset(n=6, seq_len=12, seed=2)
    batches = []
    for i in range(0, 6, 2):
        batch = default_data_collator(rows[i : i + 2])
        batch["labels"][:, 6:] = -100
        batches.append(batch)
    # HF averages the per-batch losses (each batch has the same token count here)
    reference = sum(_reference_loss(trainer.model, [b], training=False) for b in batches) / 3
    assert first["eval_loss"] == pytest.approx(reference, rel=1e-4)
    framework.undo_patches()
    assert "prediction_step" not in trainer.__dict__
    unprocessed = trainer.evaluate()
    assert unprocessed["eval_loss"] != pytest.approx(first["eval_loss"], rel=1e-3)


# --- stop requests -----------------------------------------------------------------------------


def test_any_plugin_can_stop_training(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("stop_at_step", "never_stop"), [StopAtStep, NeverStop])
    trainer = _trainer(tmp_path, tiny_llama_dir, framework, max_steps=10)
    trainer.train()
    assert trainer.state.global_step == 3
    assert framework.plugins["stop_at_step"].asked == [1, 2, 3]
    assert framework.plugins["never_stop"].asked == 3  # asked even when another says stop


def test_a_callback_stopping_on_its_own_still_stops(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("never_stop"), [NeverStop])
    trainer = _trainer(tmp_path, tiny_llama_dir, framework, max_steps=10)
    trainer.add_callback(StopAtTwo())
    trainer.train()
    assert trainer.state.global_step == 2


def test_a_stop_decided_on_evaluation_metrics_stops_at_that_step(tmp_path, tiny_llama_dir):
    framework = build_framework(_config("stop_after_eval"), [StopAfterFirstEval])
    trainer = _trainer(
        tmp_path, tiny_llama_dir, framework, max_steps=10, eval_strategy="steps", eval_steps=2
    )
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.multiprocess
def test_a_stop_on_one_rank_stops_every_rank(tmp_path, tiny_llama_dir):
    worker = os.path.join(os.path.dirname(__file__), "stop_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           worker, str(tiny_llama_dir), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # only rank 1 asks to stop, at step 2; both ranks end there
    assert [r["global_step"] for r in results] == [2, 2]
    assert [r["asked"] for r in results] == [[1, 2], [1, 2]]

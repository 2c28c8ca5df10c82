"""Multipack: token balance per step and process, every example once, determinism, the Trainer."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest
import torch
from transformers import Trainer, TrainingArguments

from fms_acceleration_aadp.multipack import (
    MultipackBatchSampler,
    MultipackError,
    number_of_steps,
    pack_epoch,
    token_lengths,
)


def _lengths(n: int = 600, seed: int = 0) -> list[int]:
    """Instruction-like lengths: mostly short, a long tail."""
    rng = random.Random(seed)
    return [int(min(2048, 20 + rng.expovariate(1 / 180))) for _ in range(n)]


@pytest.mark.parametrize("replicas", [1, 2, 8])
def test_every_example_once_per_epoch_in_a_fixed_number_of_steps(replicas):
    lengths = _lengths()
    per_rank = 8 * statistics.fmean(lengths)
    steps = number_of_steps(lengths, replicas, per_rank)
    # a budget of 8 mean-length examples per process: as many steps as 8-example batches
    assert steps == math.ceil(len(lengths) / (8 * replicas))
    for seed in (0, 1):
        epoch = pack_epoch(lengths, replicas, per_rank, seed)
        assert len(epoch) == steps and all(len(step) == replicas for step in epoch)
        seen = [i for step in epoch for bin_ in step for i in bin_]
        assert sorted(seen) == list(range(len(lengths)))
        assert all(bin_ for step in epoch for bin_ in step)  # no process ever idles


def test_processes_get_about_the_same_tokens_at_every_step():
    lengths = _lengths()
    epoch = pack_epoch(lengths, 4, 8 * statistics.fmean(lengths), seed=3)
    spreads = []
    for step in epoch:
        tokens = [sum(lengths[i] for i in bin_) for bin_ in step]
        spreads.append((max(tokens) - min(tokens)) / statistics.fmean(tokens))
    # largest-first onto the least-loaded bin: a step is uneven by at most about one example
    assert statistics.fmean(spreads) < 0.05 and max(spreads) < 0.25
    totals = [sum(lengths[i] for step in epoch for i in step[r]) for r in range(4)]
    assert (max(totals) - min(totals)) / statistics.fmean(totals) < 0.02
    # steps carry about equal token counts as well (each about total / steps)
    step_tokens = [sum(lengths[i] for b in step for i in b) for step in epoch]
    assert max(step_tokens) / min(step_tokens) < 1.3


def test_balance_is_far_better_than_plain_shuffled_batches():
    lengths, replicas, batch = _lengths(), 4, 8
    epoch = pack_epoch(lengths, replicas, batch * statistics.fmean(lengths), seed=0)
    packed = []
    for step in epoch:
        tokens = [sum(lengths[i] for i in b) for b in step]
        packed.append(max(tokens) / min(tokens))
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    plain = []
    for start in range(0, len(order) - replicas * batch + 1, replicas * batch):
        chunk = order[start : start + replicas * batch]
        tokens = [sum(lengths[i] for i in chunk[r::replicas]) for r in range(replicas)]
        plain.append(max(tokens) / min(tokens))
    assert statistics.fmean(packed) < 1.05 < 1.3 < statistics.fmean(plain)


def test_same_seed_same_batches_and_epochs_reshuffle():
    lengths = _lengths(200)
    make = [MultipackBatchSampler(lengths, 2, r, 400.0, seed=7) for r in (0, 1)]
    again = MultipackBatchSampler(lengths, 2, 0, 400.0, seed=7)
    assert list(make[0]) == list(again) and len(make[0]) == len(list(make[0]))
    first = list(make[0])
    for sampler in (make[0], make[1]):
        sampler.set_epoch(1)
    assert list(make[0]) != first and len(list(make[0])) == len(first)
    assert sorted(i for s in make for b in s for i in b) == list(range(200))


@pytest.mark.parametrize(
    ("lengths", "replicas", "per_rank", "message"),
    [
        ([5, 6], 3, 10.0, "multipack: 2 examples cannot give each of 3 processes one per step"),
        ([5, 0, 6], 1, 10.0, "multipack: example 1 has no tokens"),
        ([5, 6], 1, 0.0, "multipack: tokens per process must be > 0, got 0.0"),
    ],
)
def test_impossible_packing_is_explained(lengths, replicas, per_rank, message):
    with pytest.raises(MultipackError) as info:
        pack_epoch(lengths, replicas, per_rank, seed=0)
    assert str(info.value) == message


def test_token_lengths_of_lists_and_datasets():
    import datasets

    rows = [{"input_ids": list(range(n))} for n in (3, 1, 4)]
    assert token_lengths(rows) == [3, 1, 4]
    big = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 7 + 1) for i in range(2000)]})
    assert token_lengths(big, num_processes=2) == [i % 7 + 1 for i in range(2000)]
    with pytest.raises(MultipackError, match="example 1 has no 'input_ids' to measure"):
        token_lengths([{"input_ids": [1]}, {"text": "x"}])


def test_trainer_reads_every_example_once_per_epoch_and_evaluates_as_usual(h, tmp_path):
    lengths = [3 + (7 * i) % 29 for i in range(40)]
    rows = h.RecordedRows(h.make_rows(lengths, seed=5))
    framework = h.framework_for(h.MULTIPACK)
    args = h.train_args(tmp_path, num_train_epochs=2, per_device_eval_batch_size=64, seed=11)
    model, _ = framework.augmentation(h.tiny_causal_lm(), args, (None,))
    held = h.make_rows([4, 9, 17], seed=6)
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=held, data_collator=h.padded_batch
    )
    for callback in framework.get_callbacks_and_ready_for_train(
        model, trainer.accelerator, trainer=trainer
    ):
        trainer.add_callback(callback)
    steps = number_of_steps(lengths, 1, 4 * statistics.fmean(lengths))
    trainer.train()
    assert trainer.state.global_step == 2 * steps
    # one pass in order measures the lengths, then one read per example and epoch
    measured, first, second = (rows.read[i : i + len(rows)] for i in (0, 40, 80))
    assert len(rows.read) == 3 * len(rows) and measured == list(range(len(rows)))
    assert sorted(first) == sorted(second) == list(range(len(rows))) and first != second
    assert trainer.state.num_input_tokens_seen == 2 * sum(lengths)
    expected = pack_epoch(lengths, 1, 4 * statistics.fmean(lengths), seed=11)
    assert first == [i for step in expected for i in step[0]]
    # the evaluation loader keeps its order and batch size; its one flattened batch gives the
    # loss of the padded batch
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = model(**h.padded_batch(held), use_cache=False).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want, abs=1e-5)
    framework.undo_patches()


SAMPLER_OPTIONS = {  # transformers 5's option, 4.x's option
    "train_sampling_strategy": (
        "group_by_length",
        "train_sampling_strategy='group_by_length' asks for another one (use 'random')",
    ),
    "group_by_length": (True, "group_by_length=True asks for another one (set it to False)"),
}


@pytest.mark.parametrize("option", sorted(SAMPLER_OPTIONS))
def test_multipack_refuses_another_training_sampler(h, tmp_path, option):
    from fms_acceleration import AccelerationPluginConfigError

    if option not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip(f"this transformers' TrainingArguments has no {option}")
    value, why = SAMPLER_OPTIONS[option]
    framework = h.framework_for(h.MULTIPACK)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **{option: value})
    with pytest.raises(AccelerationPluginConfigError) as info:
        framework.augmentation(h.tiny_causal_lm(), args, (None,))
    assert str(info.value) == (
        "plugins.training.dataloader.multipack: multipack replaces the training sampler; " + why
    )

"""Exact resume: stopped at a checkpoint and resumed, the mixer draws the same categories and
samples and reaches the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest

from fms_acceleration_odm import OnlineMixingDataset


def run_log(path):
    samples, updates = {}, {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["action"] == "sample":
            index = record["samples_produced_so_far"] - 1
            samples[index] = (record["arm_idx"], record["sample_index"])
        elif record["action"] == "update":
            updates[record["step"]] = record["current_sampling_weights"]
    return samples, updates


@pytest.mark.parametrize("reward,interval", [("validation_loss", 1), ("train_loss", 4)])
def test_resumed_run_draws_what_the_uninterrupted_one_drew(h, tmp_path, reward, interval):
    def fresh(out):
        return OnlineMixingDataset(
            h.categories(n=9),
            None,
            h.categories(n=3, seed=70),
            {c: h.PadCollator() for c in ("count", "random", "repeat")},
            gamma=0.15,
            eta=3.0,
            sampling_interval=interval,
            reward_type=reward,
            output_dir=out,
            eval_batch_size=3,
        )

    whole = tmp_path / "whole"
    steps = dict(max_steps=10, save_strategy="steps", save_steps=4, gradient_accumulation_steps=2)
    h.train(whole, fresh(whole), h.odm_framework(update_interval=2, reward_type=reward), **steps)
    # the stopped run: its output folder as it was at checkpoint-4, then resumed
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-4", resumed / "checkpoint-4")
    framework = h.odm_framework(update_interval=2, reward_type=reward, resume_from_checkpoint=True)
    trainer = h.train(
        resumed, fresh(resumed), framework, resume=str(resumed / "checkpoint-4"), **steps
    )
    assert trainer.state.global_step == 10
    whole_samples, whole_updates = run_log(whole / "odm.jsonl")
    resumed_samples, resumed_updates = run_log(resumed / "odm.jsonl")
    consumed = 4 * 2 * 4  # steps x accumulation x batch
    assert min(resumed_samples) == consumed
    consumed_total = 10 * 2 * 4
    for index in range(consumed, consumed_total):
        assert resumed_samples[index] == whole_samples[index], index
    assert len({arm for arm, _ in resumed_samples.values()}) > 1
    later = [s for s in whole_updates if s > 4]
    assert sorted(resumed_updates) == later
    for step in later:
        assert resumed_updates[step] == whole_updates[step]
    # the weights moved: the comparison is not between two uniform mixtures
    assert max(whole_updates[10]) - min(whole_updates[10]) > 0.05

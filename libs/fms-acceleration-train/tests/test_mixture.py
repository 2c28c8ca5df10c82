"""The built-in mixture for online data mixing: domains, the ODM and uniform runs, and the
steps-to-target comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fms_acceleration_train import TrainJobConfig, TrainJobError, run_train_job
from fms_acceleration_train.compare import Comparison
from fms_acceleration_train.mixture_data import HELD_OUT, REWARD, mixture_domains
from fms_acceleration_train.mixture_training import configures_odm, steps_to_target

pytest.importorskip("fms_acceleration_odm")

from fms_acceleration import AccelerationFramework

SAMPLE = (
    Path(__file__).resolve().parents[3] / "sample-configurations" / "odm-sample-configuration.yaml"
)


def test_five_domains_with_disjoint_splits_the_same_for_a_seed():
    domains = mixture_domains()
    assert [d.name for d in domains] == ["sentiment", "subject", "category", "opposite", "count"]
    assert [len(d.train) for d in domains] == [96] * 5
    for d in domains:
        assert (len(d.reward), len(d.held_out)) == (REWARD, HELD_OUT)
        prompts = [set(e.prompt for e in split) for split in (d.train, d.reward, d.held_out)]
        assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert mixture_domains() == domains
    answers = {e.response for e in domains[4].train}
    assert answers <= {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_steps_to_target_reads_the_curves():
    uniform = [[4, 3.0, {}], [8, 2.0, {}], [12, 1.5, {}]]
    learned = [[4, 2.6, {}], [8, 1.4, {}], [12, 1.2, {}]]
    result = steps_to_target(uniform, learned)
    assert result["target_heldout_loss"] == 1.5
    assert (result["baseline_steps"], result["odm_steps"]) == (12, 8)
    assert result["fewer_steps"] == pytest.approx(1 / 3, abs=1e-4)
    assert steps_to_target(uniform, [[12, 1.6, {}]])["odm_steps"] is None
    assert steps_to_target([], learned) == {}


def _config(tmp_path, model, name, **kw) -> TrainJobConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        model=str(model),
        max_steps=4,
        batch_size=4,
        seq_len=48,
        learning_rate=1e-2,
        target_modules=("q_proj", "v_proj"),
        log_every=2,
    )
    return TrainJobConfig(**{**base, **kw})


def test_odm_and_uniform_runs_and_their_comparison(tmp_path, tiny_model):
    assert configures_odm(str(SAMPLE)) and not configures_odm(None)
    framework = AccelerationFramework(str(SAMPLE))
    learned = run_train_job(_config(tmp_path, tiny_model, "odm"), framework)
    uniform = run_train_job(_config(tmp_path, tiny_model, "uniform", uniform_mixture=True))
    for summary in (learned, uniform):
        assert [p[0] for p in summary.heldout_losses] == [2, 4]
        for _, mean, losses in summary.heldout_losses:
            assert sorted(losses) == ["category", "count", "opposite", "sentiment", "subject"]
            assert mean == pytest.approx(sum(losses.values()) / 5, abs=1e-5)
        assert sum(summary.data_mixing["samples_per_category"]) >= 16
        assert summary.train_examples == 96 * 5
    assert learned.data_mixing["mode"] == "odm" and uniform.data_mixing["mode"] == "uniform"
    assert uniform.data_mixing["final_sampling_ratio"] == [0.2] * 5
    assert Path(learned.data_mixing["plot"]).name == "odm_sampling_weights.png"
    updates = [json.loads(x) for x in Path(learned.data_mixing["log"]).read_text().splitlines()]
    updates = [r for r in updates if r["action"] == "update"]
    assert [r["step"] for r in updates] == [2, 4]
    # rewards came from the reward rows of all five domains and moved the weights
    assert all(r["count"] == [8.0] * 5 for r in updates)
    assert updates[-1]["current_sampling_ratio"] != [0.2] * 5
    assert "mixing plot" in learned.format() and "held-out loss" in learned.format()
    comparison = Comparison(baseline=uniform, accelerated=learned)
    target = comparison.steps_to_target
    assert target["target_heldout_loss"] == uniform.heldout_losses[-1][1]
    assert "steps to" in comparison.format()
    assert comparison.to_json()["steps_to_target"] == target


@pytest.mark.parametrize(
    "override,message",
    [
        (
            {"dataset": "x.jsonl"},
            "--dataset: online data mixing in the train job uses its built-in",
        ),
        ({"eval_split": 0.1}, "--eval-split 0.1: the built-in mixture holds out rows"),
    ],
)
def test_the_mixture_refuses_a_dataset_or_an_eval_split(tmp_path, tiny_model, override, message):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    if "dataset" in override:
        override = {"dataset": str(tmp_path / "x.jsonl")}
    with pytest.raises(TrainJobError, match=message):
        run_train_job(_config(tmp_path, tiny_model, "bad", uniform_mixture=True, **override))

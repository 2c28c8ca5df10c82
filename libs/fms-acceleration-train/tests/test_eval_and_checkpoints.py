"""Evaluation split, periodic evaluation and checkpoints, and resume in the training job."""

from __future__ import annotations

import json
import shutil

import pytest

from fms_acceleration_train import TrainJobConfig, TrainJobError, run_train_job
from fms_acceleration_train import cli as train_cli
from fms_acceleration_train.eval_and_checkpoints import (
    last_complete_checkpoint,
    resolve_resume,
    split_for_evaluation,
)

_ROWS = [
    {"prompt": f"tok{i} tok{i + 1} tok{i + 2}", "response": f"tok{i + 3} tok{i + 4}"}
    for i in range(10, 30)
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ROWS))
    return path


def _config(out, model, dataset, **kw) -> TrainJobConfig:
    base = dict(
        output_dir=str(out), model=str(model), dataset=str(dataset), max_steps=6, batch_size=4,
        seq_len=16, learning_rate=1e-2, target_modules=("q_proj", "v_proj"), log_every=1,
        eval_split=0.2, eval_steps=2, save_steps=2,
    )  # fmt: skip
    return TrainJobConfig(**{**base, **kw})


def _state(folder) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def test_split_is_seeded_disjoint_and_keeps_the_train_order():
    items = list(range(20))
    train, held = split_for_evaluation(items, 0.2, seed=7)
    assert len(held) == 4 and len(train) == 16
    assert sorted(train + held) == items and train == sorted(train)
    assert split_for_evaluation(items, 0.2, seed=7) == (train, held)
    assert split_for_evaluation(items, 0.2, seed=8)[1] != held
    assert split_for_evaluation(items, 0.0, seed=7) == (items, [])
    assert len(split_for_evaluation(items, 0.01, seed=7)[1]) == 1  # at least one
    with pytest.raises(TrainJobError) as err:
        split_for_evaluation([1, 2], 0.9, seed=0)
    assert str(err.value) == (
        "--eval-split 0.9: would hold out 2 of 2 examples, leaving none to train on"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval_steps": 2}, "--eval-steps: 2 needs --eval-split > 0 (there are no evaluation "
                            "examples)."),
        ({"eval_split": 1.0}, "--eval-split: 1.0 must be less than 1."),
        ({"save_steps": 0}, "--save-steps: 0 must be greater than 0."),
    ],
)  # fmt: skip
def test_bad_options_name_the_flag(options, message):
    with pytest.raises(TrainJobError) as err:
        TrainJobConfig(**options)
    assert str(err.value) == message


def test_cli_passes_the_new_options(tmp_path):
    parser = train_cli.argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--eval-split", "0.1", "--eval-steps", "3", "--save-steps", "4",
         "--resume-from-checkpoint", "last"]
    )  # fmt: skip
    config = train_cli.config_from_args(args)
    assert (config.eval_split, config.eval_steps, config.save_steps) == (0.1, 3, 4)
    assert config.resume_from_checkpoint == "last"


def test_resume_needs_a_complete_checkpoint(tmp_path):
    with pytest.raises(TrainJobError) as err:
        resolve_resume("last", tmp_path)
    assert str(err.value) == (
        f"--resume-from-checkpoint last: no complete checkpoint-* folder in {tmp_path}"
    )
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()  # a save that a kill interrupted
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(TrainJobError, match="checkpoint-4: not a complete checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path)


def test_periodic_eval_checkpoints_and_an_exact_resume(tmp_path, tiny_model, dataset):
    full = run_train_job(_config(tmp_path / "full", tiny_model, dataset))
    out = tmp_path / "full"
    # 2 checkpoints kept (the newest and one spare), each complete
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    history = _state(out / "checkpoint-6")["log_history"]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [step for step, _ in evals] == [2, 4, 6]
    assert all(0 < loss < 10 for _, loss in evals)
    assert full.train_examples == 16  # 20 rows, 4 held out for evaluation

    # resume a copy of the step-4 checkpoint: steps 5 and 6 repeat the uninterrupted run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = run_train_job(
        _config(resumed_dir, tiny_model, dataset, resume_from_checkpoint="last")
    )
    assert resumed.steps == 6
    assert len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-5)
    resumed_evals = [
        (e["step"], e["eval_loss"])
        for e in _state(resumed_dir / "checkpoint-6")["log_history"]
        if "eval_loss" in e
    ]
    assert resumed_evals[-1][0] == 6
    assert resumed_evals[-1][1] == pytest.approx(evals[-1][1], rel=1e-5)

"""Evaluation split, periodic evaluation and checkpoints, and resuming from the last checkpoint:
what a hyper-parameter search (or any interruptible run) needs of the training job."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationInfo

from .errors import TrainJobError

T = TypeVar("T")
RESUME_LAST = "last"
# what the Trainer writes last into a checkpoint folder: its presence means the save finished
_COMPLETE_MARKER = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
KEPT_CHECKPOINTS = 2  # the newest, and the one before in case a kill interrupts a save


def eval_steps_need_a_split(value: int | None, info: ValidationInfo) -> int | None:
    """--eval-steps without examples to evaluate on is a mistake, not a silent no-op."""
    if value is not None and not info.data.get("eval_split"):
        raise ValueError("needs --eval-split > 0 (there are no evaluation examples)")
    return value


def split_for_evaluation(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, evaluation): a seeded random `fraction` of the examples (at least one) is held
    out; the train examples keep their order."""
    if fraction <= 0:
        return list(examples), []
    count = max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise TrainJobError(
            f"--eval-split {fraction}: would hold out {count} of {len(examples)} examples, "
            "leaving none to train on"
        )
    held = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def schedule_arguments(
    eval_steps: int | None, save_steps: int | None, has_eval_split: bool, batch_size: int
) -> dict[str, Any]:
    """TrainingArguments for periodic evaluation and checkpoints (none unless asked)."""
    arguments: dict[str, Any] = {"save_strategy": "no", "eval_strategy": "no"}
    if has_eval_split:
        arguments["per_device_eval_batch_size"] = batch_size
        # no steps given: evaluate once, at the end of each epoch
        arguments["eval_strategy"] = "steps" if eval_steps else "epoch"
        if eval_steps:
            arguments["eval_steps"] = eval_steps
    if save_steps:
        arguments.update(
            save_strategy="steps", save_steps=save_steps, save_total_limit=KEPT_CHECKPOINTS
        )
    return arguments


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The `checkpoint-N` folder with the largest N whose save finished, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / _COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder to resume from: `last` is the newest complete one in
    `output_dir`; a path must be a checkpoint folder."""
    if value is None:
        return None
    if value == RESUME_LAST:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise TrainJobError(
                f"--resume-from-checkpoint last: no complete checkpoint-* folder in {output_dir}"
            )
        return str(checkpoint)
    path = Path(value)
    if not (path / _COMPLETE_MARKER).is_file():
        raise TrainJobError(
            f"--resume-from-checkpoint {value}: not a complete checkpoint folder (no "
            f"{_COMPLETE_MARKER}); pass a checkpoint-N folder or 'last'"
        )
    return str(path)

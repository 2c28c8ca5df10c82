"""Ctrl-C during training: the first one finishes the step, saves a checkpoint and stops; a
second one stops at once. Either way the job ends with one line saying what was saved."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C; the message says whether and where a checkpoint was saved."""


class CheckpointOnInterrupt(TrainerCallback):
    """Turns the first SIGINT into 'save a checkpoint at the end of this step, then stop'."""

    def __init__(self) -> None:
        self.requested = False
        self.saved: Path | None = None
        self.step = 0

    def request(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to stop "
            "without one)",
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.requested:
            self.saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        return control

    def outcome(self, max_steps: int) -> str:
        """The one line the job ends with after an interrupt."""
        if self.saved is not None:
            return (
                f"interrupted at step {self.step} of {max_steps}: checkpoint saved to "
                f"{self.saved}; continue with --resume-from-checkpoint {self.saved}"
            )
        return "interrupted: no checkpoint was saved"


@contextmanager
def checkpoint_on_interrupt() -> Iterator[CheckpointOnInterrupt]:
    """Install the SIGINT handler for the block (main thread only), restore it afterwards."""
    callback = CheckpointOnInterrupt()
    try:
        previous = signal.signal(signal.SIGINT, callback.request)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield callback
        return
    try:
        yield callback
    except KeyboardInterrupt:
        raise TrainingInterrupted(callback.outcome(0)) from None
    finally:
        signal.signal(signal.SIGINT, previous)

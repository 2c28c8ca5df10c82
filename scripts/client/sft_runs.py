"""Running the client's entry point for one row, and reading what it left behind."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_rows import COMMON_FLAGS, Row

# `python -m tuning.sft_trainer`, its RNG seeded first (why: sft_launch.py)
LAUNCHER = Path(__file__).with_name("sft_launch.py")
# the client's file tracker writes one JSON object per logged value into its output dir
TRAINING_LOGS = "training_logs.jsonl"
TERMINATION_LOG = "termination.log"
# sft_trainer.main's exit codes (tuning/utils/error_logging.py): 1 when it blames the input
USER_ERROR_EXIT_CODE = 1
_ACTIVE_PLUGIN = re.compile(r"^Active Plugin: (\w+)\.", re.MULTILINE)


@dataclass
class RunResult:
    """What one run of the client showed."""

    outcome: str
    """trained, refused (the client blamed its input: exit 1) or crashed"""
    losses: list[tuple[int, float]] = field(default_factory=list)
    plugins: frozenset[str] = frozenset()
    reason: str = ""
    seconds: float = 0.0


def client_command(row: Row, model: Path, data: Path, output: Path) -> list[str]:
    """The argv that runs the client's `python -m tuning.sft_trainer` for `row`."""
    return [
        sys.executable,
        str(LAUNCHER),
        "--model_name_or_path", str(model),
        "--training_data_path", str(data),
        "--output_dir", str(output),
        *COMMON_FLAGS,
        *row.flags,
    ]  # fmt: skip


def parse_losses(text: str) -> list[tuple[int, float]]:
    """(step, loss) of every `training_loss` record of a training_logs.jsonl, in step order."""
    losses = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{TRAINING_LOGS} line {number}: not JSON ({err.msg})") from None
        if record.get("name") == "training_loss":
            losses.append((int(record["data"]["step"]), float(record["data"]["value"])))
    return sorted(losses)


def active_plugins(log: str) -> frozenset[str]:
    """The plugin classes the framework reported active in the client's output."""
    return frozenset(_ACTIVE_PLUGIN.findall(log))


def _last_lines(text: str, count: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


def classify(
    returncode: int, losses: list[tuple[int, float]], termination: str, log: str, steps: int
) -> tuple[str, str]:
    """(outcome, reason) of a finished run.

    The client exits 1 when it blames the input (our configuration errors are ValueErrors) and
    writes why into its termination log; any other failure, or a run that exits 0 without
    `steps` finite losses, crashed.
    """
    if returncode == 0:
        if len(losses) != steps:
            return "crashed", f"exit 0 but {len(losses)} losses logged for {steps} steps"
        bad = [f"step {s}: {v}" for s, v in losses if not math.isfinite(v)]
        if bad:
            return "crashed", "non-finite loss at " + ", ".join(bad)
        return "trained", ""
    reason = _last_lines(termination) if termination.strip() else _last_lines(log)
    if returncode == USER_ERROR_EXIT_CODE:
        return "refused", reason
    return "crashed", f"exit {returncode}: {reason}"


def run_row(row: Row, model: Path, data: Path, folder: Path, steps: int) -> RunResult:
    """Run the client for `row` in its own process; its log and outputs stay under `folder`."""
    folder.mkdir(parents=True)
    output = folder / "output"
    termination = folder / TERMINATION_LOG
    env = {**os.environ, "TERMINATION_LOG_FILE": str(termination)}
    start = time.perf_counter()
    with open(folder / "log.txt", "w", encoding="utf-8") as log_file:
        done = subprocess.run(
            client_command(row, model, data, output),
            cwd=folder,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    log = (folder / "log.txt").read_text(encoding="utf-8", errors="replace")
    logs = output / TRAINING_LOGS
    losses = parse_losses(logs.read_text(encoding="utf-8")) if logs.is_file() else []
    stop = termination.read_text(encoding="utf-8") if termination.is_file() else ""
    outcome, reason = classify(done.returncode, losses, stop, log, steps)
    return RunResult(outcome, losses, active_plugins(log), reason, seconds)

"""What the hpo tests share besides fixtures: search configs, training flags, the CLI.

A uniquely named module, not conftest: every plugin's tests have a conftest, and importing
`conftest` by name gets whichever one was imported first in a whole-repository run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml


def write_search_config(path: Path, pruner: dict, **stanza) -> Path:
    """An acceleration YAML with only a training.hpo stanza."""
    body = {
        "metric": "eval_loss",
        "eval_every": 2,
        "checkpoint_every": 2,
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": pruner,
        "search_space": [
            {"name": "learning_rate", "type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            {"name": "lora_r", "type": "categorical", "choices": [4, 8]},
        ],
        **stanza,
    }
    path.write_text(yaml.safe_dump({"plugins": {"training": {"hpo": body}}}, sort_keys=False))
    return path


def train_flags(model: Path, data: Path, max_steps: int) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--max-steps", str(max_steps),
            "--batch-size", "4", "--seq-len", "16", "--target-modules", "q_proj", "v_proj",
            "--eval-split", "0.1"]  # fmt: skip


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


CLI = [sys.executable, "-m", "fms_acceleration.cli", "search"]

"""Shared fixtures of the hpo tests: a tiny model, a small JSONL dataset, search configs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from fms_acceleration.testing import save_tiny_model

# Words of the tiny word-level tokenizer (tok0..tok123), so nothing maps to <unk>.
ROWS = [
    {"prompt": f"tok{i} tok{i + 1} tok{i + 2}", "response": f"tok{i + 3} tok{i + 4}"}
    for i in range(10, 50)
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


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

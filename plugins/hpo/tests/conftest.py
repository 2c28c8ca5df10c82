"""Shared fixtures of the hpo tests: a tiny model and a small JSONL dataset."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fms_acceleration.testing import save_tiny_model

# the tests import hpo_search_helpers by name; pytest's importlib mode does not put test
# folders on sys.path
if os.path.dirname(__file__) not in sys.path:
    sys.path.append(os.path.dirname(__file__))

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

"""Shared fixtures of the train job's tests."""

from __future__ import annotations

import pytest

from fms_acceleration.testing import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with its tokenizer, saved once per test module."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)

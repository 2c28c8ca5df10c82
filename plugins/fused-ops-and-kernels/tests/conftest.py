"""Shared fixtures: the Triton interpreter is on for every test (kernels run on CPU)."""

from __future__ import annotations

import os

# Must be set before triton.jit decorates the kernels, i.e. before fms_acceleration_foak imports.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

# Per-dtype tolerances (atol, rtol) against an fp32 reference computed on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=1.0):
    """Compare in fp32 with the tolerance of `dtype` (scaled for accumulations)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale
    )


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy requiring grad (optionally cast)."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


@pytest.fixture
def seed(request) -> int:
    """A seed that differs per test (from its node id) but is stable across runs."""
    value = sum(map(ord, request.node.nodeid)) % 10_000
    torch.manual_seed(value)
    return value


@pytest.fixture
def assert_close():
    """Per-dtype closeness check (tests run with --import-mode=importlib: no helper imports)."""
    return _assert_close


@pytest.fixture
def leaf():
    """Fresh leaf copies requiring grad."""
    return _leaf

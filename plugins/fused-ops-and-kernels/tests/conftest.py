"""Shared fixtures. Without CUDA the Triton interpreter is on (kernels run on CPU); with CUDA
the kernel tests run the compiled kernels on the GPU (scripts/gpu/suite.sh)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# foak_quantized_bases is imported by name; pytest's importlib mode does not put test folders
# on sys.path
if os.path.dirname(__file__) not in sys.path:
    sys.path.append(os.path.dirname(__file__))

# Must be set before triton.jit decorates the kernels, i.e. before fms_acceleration_foak imports.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRETER

# Tiny tensors on a shared 2-core machine: a second intra-op thread only spin-waits (and stalls
# whenever the other core is busy), making tiny-model steps up to 100x slower.
torch.set_num_threads(1)

# Per-dtype tolerances (atol, rtol) against an fp32 reference computed on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
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
def device() -> torch.device:
    """Where kernel tests put their tensors: CUDA when it is there, else CPU (interpreter)."""
    return torch.device("cuda" if ON_CUDA else "cpu")


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


def _foak_plugin_classes() -> list:
    from fms_acceleration_foak import FastKernelsAccelerationPlugin

    return [FastKernelsAccelerationPlugin]


def _tiny_batches(steps: int, micro: int, vocab: int = 128, seed: int = 0) -> list[list[dict]]:
    """steps x micro-batches of 4 sequences; some label tails are -100 like padding."""
    from fms_acceleration.testing import tiny_dataset

    rows = tiny_dataset(n=steps * micro * 4, seq_len=16, vocab=vocab, seed=seed)
    batches = []
    for i in range(0, len(rows), 4):
        chunk = rows[i : i + 4]
        batch = {k: torch.tensor([r[k] for r in chunk]) for k in chunk[0]}
        batch["labels"][1, -5:] = -100
        batch["labels"][3, :3] = -100
        batches.append(batch)
    return [batches[s * micro : (s + 1) * micro] for s in range(steps)]


def _train(model: torch.nn.Module, batches: list[list[dict]], lr: float = 3e-3) -> list[float]:
    """AdamW steps with gradient accumulation normalised by num_items_in_batch, as the Trainer."""
    torch.manual_seed(0)  # identical dropout masks (GPTBigCode has dropout) in both runs
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in batches:
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step)
        total = 0.0
        for batch in step:
            loss = model(**batch, num_items_in_batch=torch.tensor(num_items)).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


@pytest.fixture
def foak_classes():
    """The plugin classes to build frameworks from (no entry-point discovery)."""
    return _foak_plugin_classes()


@pytest.fixture
def tiny_batches():
    return _tiny_batches


@pytest.fixture
def train():
    return _train

"""Which implementation of the grouped GEMM runs: Triton (CUDA, or the interpreter) or PyTorch."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("moe_backend", default="auto")


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a grouped GEMM on these tensors takes the Triton path.

    'auto' picks Triton on CUDA only: on a CPU the interpreter is a test vehicle, far slower
    than the PyTorch path, so tests ask for it explicitly with backend('triton').
    """
    mode = _BACKEND.get()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "triton":
        if not (on_cuda or triton_interpret()):
            raise RuntimeError(
                "backend('triton') needs CUDA tensors or TRITON_INTERPRET=1 set before triton "
                "is imported"
            )
        return True
    return on_cuda


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force 'triton' or 'torch' (or 'auto': Triton on CUDA) within a block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)

"""Choose between the Triton kernels and their plain-PyTorch counterparts."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
import triton

BACKENDS = ("auto", "triton", "torch")
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("foak_backend", default="auto")


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1, i.e. Triton kernels run on CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel call on these tensors should take the Triton path."""
    mode = _BACKEND.get()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "triton" and not (on_cuda or triton_interpret()):
        raise RuntimeError(
            "backend('triton') needs CUDA tensors or TRITON_INTERPRET=1 set before importing "
            "fms_acceleration_foak.kernels"
        )
    return on_cuda or triton_interpret()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force 'triton' or 'torch' (or 'auto': Triton on CUDA or under the interpreter) in a block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def row_block(n_cols: int, cap: int = 65536) -> int:
    """A power-of-two block that covers a row of n_cols elements (one program per row)."""
    block = triton.next_power_of_2(n_cols)
    if block > cap:
        raise ValueError(f"row of {n_cols} elements exceeds the kernel block limit {cap}")
    return block


def num_warps_for(block: int) -> int:
    """Warp count for a row-wise kernel of this block size (the interpreter ignores it)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4

"""Choose between the Triton kernels and their plain-PyTorch counterparts, and launch them."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from typing import Any

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


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current CUDA device for a launch (a no-op off CUDA).

    Triton launches on the current device's stream, not on the device of the pointers it is
    given: with a model split over GPUs in one process, an unguarded launch for a tensor on
    cuda:1 would run on cuda:0.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any):
    """Launch a Triton kernel under `device` (the device of the tensors it reads and writes)."""
    with device_guard(device):
        return kernel[grid](*args, **meta)


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 8 elsewhere (interpreter programs)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_multiprocessors(index)


def row_block(n_cols: int, cap: int = 65536) -> int:
    """A power-of-two block that covers a row of n_cols elements (one program per row)."""
    block = triton.next_power_of_2(n_cols)
    if block > cap:
        raise ValueError(f"row of {n_cols} elements exceeds the kernel block limit {cap}")
    return block


def warps_for(elements: int, per_thread: int, cap: int = 32) -> int:
    """Warps so that a program's tile of `elements` leaves about `per_thread` values per thread.

    Fewer values per thread means fewer registers per tensor held in the tile: the budget that
    decides occupancy and spills for row-wise kernels.
    """
    warps = max(1, elements // (32 * per_thread))
    return min(cap, triton.next_power_of_2(warps))


def num_warps_for(block: int) -> int:
    """Warp count for a row-wise kernel of this block size (the interpreter ignores it)."""
    return warps_for(block, per_thread=16, cap=16)

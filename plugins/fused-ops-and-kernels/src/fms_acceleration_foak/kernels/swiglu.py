"""SwiGLU activation silu(gate) * up: Triton forward and backward in one autograd Function."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from .reference import swiglu_reference

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    # transformers applies silu in the input dtype before multiplying: round the same way.
    act = (g * tl.sigmoid(g)).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + offs, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * act).to(DUP.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=BLOCK)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with a Triton kernel on CUDA (or TRITON_INTERPRET=1), PyTorch elsewhere."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} "
            f"{gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)

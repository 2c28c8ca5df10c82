"""SwiGLU activation silu(gate) * up: Triton forward and backward in autograd Functions.

The kernels see gate and up as [rows, cols] with their own row strides, so the two halves of a
packed [.., 2 * I] gate_up projection (MoE experts in transformers 5) are read in place, and
their gradient is written into one [.., 2 * I] buffer. The backward can also hand back the
activation itself (recomputed, bit-identical to the forward's), which the fused LoRA MLP needs
for its down projection's LoRA gradient: one pass instead of a chain of fp32 temporaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import launch, use_triton
from .reference import swiglu_reference

TILE = 1024  # elements per program: 8 values per thread at 4 warps (16-byte bf16 accesses)
NUM_WARPS = 4


@triton.jit
def _tile(pid_rows, pid_cols, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Row indices (int64), column indices and mask of one [ROWS, BLOCK] tile."""
    rows = tl.cast(pid_rows, tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = pid_cols * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(
    GATE,
    UP,
    OUT,
    stride_g,
    stride_u,
    stride_o,
    n_rows,
    n_cols,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, ROWS, BLOCK)
    g = tl.load(GATE + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    # transformers applies silu in the input dtype before multiplying: round the same way.
    act = (g * tl.sigmoid(g)).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + rows * stride_o + cols, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT,
    GATE,
    UP,
    DGATE,
    DUP,
    H,
    stride_d,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    stride_h,
    n_rows,
    n_cols,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_H: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, ROWS, BLOCK)
    dout = tl.load(DOUT + rows * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    # silu'(g) = s(g) * (1 + g * (1 - s(g)))
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + rows * stride_dg + cols, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + rows * stride_du + cols, (dout * act).to(DUP.dtype.element_ty), mask=mask)
    if WRITE_H:
        h = act.to(H.dtype.element_ty).to(tl.float32) * u
        tl.store(H + rows * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] view with unit column stride (a copy only when no such view exists)."""
    t2 = t if t.dim() == 2 else t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < t2.shape[1]):
        t2 = t2.contiguous()
    return t2


def launch_shape(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int]:
    """(grid, ROWS, BLOCK): tiles of TILE elements, several rows each when rows are narrow."""
    block = min(triton.next_power_of_2(n_cols), TILE)
    rows = TILE // block
    return (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block)), rows, block


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as a new contiguous tensor (no autograd); Triton where available."""
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    g2, u2 = _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    grid, rows, block = launch_shape(n_rows, n_cols)
    launch(
        _swiglu_fwd_kernel, grid, gate.device,
        g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), n_rows, n_cols,
        ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out.view(gate.shape)


def swiglu_backward(
    dout: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    want_h: bool = False,
    dgate_up: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(h, dgate, dup) of out = h = silu(gate) * up for an upstream gradient dout.

    h (the recomputed activation) only with want_h. With dgate_up ([.., 2 * cols]), dgate and
    dup are written into its two halves. Gradients come back in gate's dtype.
    """
    if not use_triton(dout, gate, up):
        return _swiglu_backward_torch(dout, gate, up, want_h, dgate_up)
    d2, g2, u2 = _rows(dout), _rows(gate), _rows(up)
    n_rows, n_cols = g2.shape
    if dgate_up is not None:
        packed = dgate_up.view(n_rows, 2 * n_cols)
        dg, du = packed[:, :n_cols], packed[:, n_cols:]
    else:
        dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        du = torch.empty_like(dg)
    h = torch.empty_like(dg) if want_h else None
    grid, rows, block = launch_shape(n_rows, n_cols)
    launch(
        _swiglu_bwd_kernel, grid, gate.device,
        d2, g2, u2, dg, du, h if h is not None else dg,
        d2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0),
        h.stride(0) if h is not None else 0, n_rows, n_cols,
        ROWS=rows, BLOCK=block, WRITE_H=want_h, num_warps=NUM_WARPS,
    )  # fmt: skip
    shape = gate.shape
    h = h.view(shape) if h is not None else None
    return h, dg.reshape(shape), du.reshape(shape)


def _swiglu_backward_torch(dout, gate, up, want_h, dgate_up):
    wide = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(wide), up.to(wide), dout.to(wide)
    sig = torch.sigmoid(g)
    act = g * sig
    dgate = (d * u * sig * (1.0 + g * (1.0 - sig))).to(gate.dtype)
    dup = (d * act).to(gate.dtype)
    h = (act.to(gate.dtype) * up) if want_h else None
    if dgate_up is not None:
        torch.cat([dgate, dup], dim=-1, out=dgate_up.view(*gate.shape[:-1], -1))
        n = gate.shape[-1]
        dgate, dup = dgate_up[..., :n], dgate_up[..., n:]
    return h, dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up; saves gate and up, recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        gate, up = ctx.saved_tensors
        _, dgate, dup = swiglu_backward(dout, gate, up)
        return dgate, dup


class SwiGLUPackedFunction(torch.autograd.Function):
    """silu(gate) * up of a packed [.., 2 * I] gate_up; its gradient is one [.., 2 * I] tensor."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        swiglu_backward(dout, gate, up, dgate_up=grad)
        return grad


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with a Triton kernel on CUDA (or TRITON_INTERPRET=1), PyTorch elsewhere."""
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    if gate.dtype == up.dtype and use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate, up = gate_up.chunk(2, -1) (MoE experts' packed projection)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs an even last dim, got {tuple(gate_up.shape)}")
    if use_triton(gate_up):
        return SwiGLUPackedFunction.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up

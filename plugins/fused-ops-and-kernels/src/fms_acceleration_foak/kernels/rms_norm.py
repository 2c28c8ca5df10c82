"""RMSNorm: Triton forward and backward in one autograd Function.

Launch shapes follow the row width:
- narrow rows (head_dim 64/128 of Qwen3's q_norm/k_norm, hidden 576) are processed as tiles of
  several rows per program, so a program moves a few thousand elements, not one 128-wide row;
- rows up to MAX_FUSED_BLOCK stay in registers, one row per step, with warps chosen so each
  thread holds about 8 values per tensor in the backward (no spills at hidden 4096 or 8192);
- wider rows (hidden 16384) are walked in column chunks, twice (the second pass reads the row
  back from cache), instead of holding dy, x, w and the weight-gradient sum of a whole row.
The backward runs a few programs per multiprocessor; each walks its share of row tiles and
keeps its partial weight gradient, and one sum over programs finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._dispatch import launch, multiprocessors, use_triton, warps_for
from .reference import rms_norm_reference

MAX_FUSED_BLOCK = 8192  # widest row kept whole in registers
CHUNK = 4096  # column chunk of wider rows
TILE = 2048  # elements of a multi-row tile for narrow rows


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    Y,
    W,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    # Compute in fp32: bf16/fp16 arithmetic loses precision (and is wrong in the interpreter).
    if CHUNKED:
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        y_row = Y + row * stride_y
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            # transformers rounds the normalised value to the input dtype before the weight.
            normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
            tl.store(y_row + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)
    else:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        y = (normed * w[None, :]).to(Y.dtype.element_ty)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


@triton.jit
def _load_bwd_chunk(dy_row, x_row, W, cols, n_cols):
    """dy, x and the weight over `cols` of one row, in fp32 (0 past the row's end)."""
    mask = cols < n_cols
    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return dy, x, w


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    n_tiles,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    if CHUNKED:
        # One row per step, in column chunks; this program's partial dW lives in DW_PARTIAL
        # (zero-initialised) rather than in registers.
        dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
        for row32 in range(pid, n_rows, n_programs):
            row = tl.cast(row32, tl.int64)
            rstd = tl.load(RSTD + row)
            dy_row, x_row = DY + row * stride_dy, X + row * stride_x
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                dy, x, w = _load_bwd_chunk(dy_row, x_row, W, cols, n_cols)
                dot += dy * w * x
            mean = tl.sum(dot, axis=0) * rstd / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                dy, x, w = _load_bwd_chunk(dy_row, x_row, W, cols, n_cols)
                normed = x * rstd
                dx = rstd * (dy * w - normed * mean)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
                tl.store(dw_row + cols, dw, mask=mask)
    else:
        cols = tl.arange(0, BLOCK)
        col_mask = cols < n_cols
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for tile in range(pid, n_tiles, n_programs):
            rows = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            normed = x * rstd[:, None]
            dyw = dy * w[None, :]
            mean = tl.sum(dyw * normed, axis=1) / n_cols
            dx = rstd[:, None] * (dyw - normed * mean[:, None])
            dx_ptrs = DX + rows[:, None] * stride_dx + cols[None, :]
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * normed.to(X.dtype.element_ty).to(tl.float32)
        dw = tl.sum(dw_acc, axis=0)
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


@dataclass(frozen=True)
class RMSNormLaunch:
    """Block, rows per tile and warps of the forward and backward for one row width."""

    block: int
    rows: int
    fwd_warps: int
    bwd_warps: int
    chunked: bool


def launch_config(n_cols: int) -> RMSNormLaunch:
    """The launch shape for rows of n_cols elements (see the module docstring)."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_BLOCK:
        return RMSNormLaunch(CHUNK, 1, warps_for(CHUNK, 16), warps_for(CHUNK, 8), True)
    rows = max(1, TILE // block)
    elements = rows * block
    # forward holds x (and w); backward holds dy, x, w and the dW sum: fewer values per thread
    return RMSNormLaunch(
        block, rows, warps_for(elements, 16, cap=16), warps_for(elements, 8), False
    )


def backward_programs(n_tiles: int, bwd_warps: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill every multiprocessor a few times over."""
    per_sm = max(1, 32 // bwd_warps)
    return max(1, min(n_tiles, per_sm * multiprocessors(device)))


class RMSNormFunction(torch.autograd.Function):
    """y = weight * rmsnorm(x); saves only x and one fp32 rstd per row for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        cfg = launch_config(n_cols)
        launch(
            _rms_norm_fwd_kernel, (triton.cdiv(n_rows, cfg.rows),), x.device,
            x2, y, weight, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            ROWS=cfg.rows, BLOCK=cfg.block, CHUNKED=cfg.chunked, num_warps=cfg.fwd_warps,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        cfg = launch_config(n_cols)
        n_tiles = triton.cdiv(n_rows, cfg.rows)
        n_programs = backward_programs(n_tiles, cfg.bwd_warps, x2.device)
        alloc = torch.zeros if cfg.chunked else torch.empty
        dw_partial = alloc((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        launch(
            _rms_norm_bwd_kernel, (n_programs,), x2.device,
            dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, n_tiles,
            ROWS=cfg.rows, BLOCK=cfg.block, CHUNKED=cfg.chunked, num_warps=cfg.bwd_warps,
        )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA (or TRITON_INTERPRET=1), PyTorch elsewhere."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)

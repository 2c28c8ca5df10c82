"""RMSNorm: Triton forward and backward in one autograd Function."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import num_warps_for, row_block, use_triton
from .reference import rms_norm_reference


@triton.jit
def _rms_norm_fwd_kernel(X, Y, W, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Compute in fp32: bf16/fp16 arithmetic loses precision (and is wrong in the interpreter).
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    # transformers rounds the normalised value to the input dtype before applying the weight.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


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
    rows_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Advance 64-bit pointers row by row: row * stride can overflow int32 on large inputs.
    first = row_start.to(tl.int64)
    dy_ptr = DY + first * stride_dy
    x_ptr = X + first * stride_x
    dx_ptr = DX + first * stride_dx
    rstd_ptr = RSTD + first
    for _ in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        normed = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - normed * (tl.sum(dyw * normed, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * normed.to(X.dtype.element_ty).to(tl.float32)
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=mask)


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 8)


class RMSNormFunction(torch.autograd.Function):
    """y = weight * rmsnorm(x); saves only x and one fp32 rstd per row for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = row_block(n_cols)
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, y, weight, rstd, x2.stride(0), y.stride(0), n_cols, eps,
            BLOCK=block, num_warps=num_warps_for(block),
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        n_programs = _num_programs(n_rows, x2.device)
        rows_per_program = triton.cdiv(n_rows, n_programs)
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        block = row_block(n_cols)
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program, BLOCK=block, num_warps=num_warps_for(block),
        )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA (or TRITON_INTERPRET=1), PyTorch elsewhere."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)

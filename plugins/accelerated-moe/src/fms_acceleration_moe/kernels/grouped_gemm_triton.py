"""The grouped expert GEMM in Triton, forward and backward, with the gather/scatter fused.

Rows sorted by expert are cut into tiles of BLOCK_M rows that never straddle two experts; a
program takes one tile and one BLOCK_N slice of the output features. It loads its input rows
through `gather` (token rows of the unsorted input) and stores through `scatter` (positions in
the (N, k) routing order), so neither a sorted copy of the input nor a padded per-expert buffer
exists. The backward runs the same kernel on the transposed weight for the input gradient, and
a second kernel sums each expert's weight gradient over its rows, again reading both operands
through their index vectors.

The tile table is built on the device from the per-expert offsets, for an upper bound of
ceil(S / BLOCK_M) + E tiles: no host sync. Tiles past the last are empty programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import triton_interpret

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 4
# an fp32 (IEEE, no TF32) tile needs twice the registers: on sm_80 4 warps spill
NUM_WARPS_FP32 = 8


@triton.jit
def _grouped_linear_kernel(
    X,
    W,
    Y,
    GATHER,
    SCATTER,
    TILE_EXPERT,
    TILE_START,
    OFFSETS,
    n_experts,
    n_out,
    n_in,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_GATHER: tl.constexpr,
    HAS_SCATTER: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y[scatter[r]] = X[gather[r]] @ W[e].T for the rows r of one tile of expert e."""
    tile = tl.program_id(0)
    expert = tl.load(TILE_EXPERT + tile)
    if expert >= n_experts:
        return
    row_start = tl.load(TILE_START + tile)
    row_end = tl.load(OFFSETS + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if HAS_GATHER:
        src = tl.load(GATHER + rows, mask=row_mask, other=0)
    else:
        src = rows
    if HAS_SCATTER:
        dst = tl.load(SCATTER + rows, mask=row_mask, other=0)
    else:
        dst = rows
    src = src.to(tl.int64)
    dst = dst.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_out
    w_base = W + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_in
        x = tl.load(
            X + src[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(
        Y + dst[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(Y.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _grouped_weight_grad_kernel(
    DY,
    X,
    DW,
    GATHER,
    SCATTER,
    OFFSETS,
    n_out,
    n_in,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    HAS_GATHER: tl.constexpr,
    HAS_SCATTER: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DW[e] = sum over the rows r of expert e of DY[scatter[r]].T @ X[gather[r]]."""
    expert = tl.program_id(0)
    cols_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < n_out
    k_mask = cols_k < n_in
    row_begin = tl.load(OFFSETS + expert)
    row_end = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_begin, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if HAS_GATHER:
            src = tl.load(GATHER + rows, mask=row_mask, other=0)
        else:
            src = rows
        if HAS_SCATTER:
            dst = tl.load(SCATTER + rows, mask=row_mask, other=0)
        else:
            dst = rows
        src = src.to(tl.int64)
        dst = dst.to(tl.int64)
        dy = tl.load(
            DY + dst[None, :] * stride_dym + cols_n[:, None] * stride_dyn,
            mask=n_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            X + src[:, None] * stride_xm + cols_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if FP32_DOT:
            acc += tl.dot(dy.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(dy, x)
    dw = DW + expert.to(tl.int64) * stride_we
    tl.store(
        dw + cols_n[:, None] * stride_wn + cols_k[None, :] * stride_wk,
        acc.to(DW.dtype.element_ty),
        mask=n_mask[:, None] & k_mask[None, :],
    )


def launch(kernel, grid, device: torch.device, *args, **meta):
    """Launch a kernel with `device` current (Triton launches on the current device's stream);
    the seam where the AOT compiler records launches instead of running them."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return kernel[grid](*args, **meta)
    return kernel[grid](*args, **meta)


def _options(gather: torch.Tensor | None, scatter: torch.Tensor | None, fp32_dot: bool) -> dict:
    """The constexprs and warps both grouped kernels take."""
    return dict(
        HAS_GATHER=gather is not None,
        HAS_SCATTER=scatter is not None,
        FP32_DOT=fp32_dot,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=_warps(fp32_dot),
    )


def tile_table(offsets: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """(expert, first row) of every BLOCK_M tile, padded to ceil(S / BLOCK_M) + E entries; the
    padding tiles name expert E (no work)."""
    num_experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
    tile_end = tiles.cumsum(0)
    upper = triton.cdiv(num_rows, block_m) + num_experts
    index = torch.arange(upper, device=offsets.device)
    expert = torch.searchsorted(tile_end, index, right=True)
    safe = expert.clamp(max=num_experts - 1)
    first = offsets[safe] + (index - (tile_end - tiles)[safe]) * block_m
    return expert.to(torch.int32), first.to(torch.int64)


def _fp32_dot(*tensors: torch.Tensor) -> bool:
    # fp32 inputs keep fp32 products (no TF32); the interpreter's bf16 arithmetic is wrong, so
    # there every operand is widened first
    return triton_interpret() or any(t.dtype == torch.float32 for t in tensors)


def _warps(fp32_dot: bool) -> int:
    return NUM_WARPS_FP32 if fp32_dot else NUM_WARPS


def _int_or_dummy(index: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return index if index is not None else like


def grouped_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    num_rows: int,
) -> torch.Tensor:
    """(num_rows, out): row scatter[r] = x[gather[r]] @ weight[e(r)].T (weight (E, out, in))."""
    num_experts, n_out, n_in = weight.shape
    y = x.new_empty(num_rows, n_out)
    if num_rows == 0:
        return y
    expert, first = tile_table(offsets, num_rows, BLOCK_M)
    fp32_dot = _fp32_dot(x, weight)
    grid = (expert.numel(), triton.cdiv(n_out, BLOCK_N))
    launch(
        _grouped_linear_kernel,
        grid,
        x.device,
        x,
        weight,
        y,
        _int_or_dummy(gather, offsets),
        _int_or_dummy(scatter, offsets),
        expert,
        first,
        offsets,
        num_experts,
        n_out,
        n_in,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        weight.stride(2),
        y.stride(0),
        y.stride(1),
        **_options(gather, scatter, fp32_dot),
    )
    return y


def grouped_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    weight_shape: torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(E, out, in): per expert, the sum over its rows of dy[scatter[r]].T @ x[gather[r]]."""
    num_experts, n_out, n_in = weight_shape
    dw = dy.new_empty(num_experts, n_out, n_in, dtype=dtype)
    fp32_dot = _fp32_dot(dy, x)
    grid = (num_experts, triton.cdiv(n_out, BLOCK_N), triton.cdiv(n_in, BLOCK_K))
    launch(
        _grouped_weight_grad_kernel,
        grid,
        dy.device,
        dy,
        x,
        dw,
        _int_or_dummy(gather, offsets),
        _int_or_dummy(scatter, offsets),
        offsets,
        n_out,
        n_in,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        dw.stride(1),
        dw.stride(2),
        **_options(gather, scatter, fp32_dot),
    )
    return dw


class GroupedLinearFunction(torch.autograd.Function):
    """Autograd around the Triton grouped GEMM (forward, input and weight gradients)."""

    @staticmethod
    def forward(ctx, x, weight, offsets, gather, scatter):
        rows = gather.numel() if gather is not None else x.shape[0]
        y = grouped_linear_forward(x, weight, offsets, gather, scatter, rows)
        ctx.save_for_backward(x, weight, offsets, gather, scatter)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, offsets, gather, scatter = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            rows = gather.numel() if gather is not None else x.shape[0]
            # the input gradient of each sorted row, read from dy through `scatter`
            dx_rows = grouped_linear_forward(
                dy, weight.transpose(1, 2), offsets, scatter, None, rows
            )
            if gather is None:
                dx = dx_rows
            else:
                # a token routed to k experts sums k row gradients
                dx = torch.zeros_like(x).index_add_(0, gather, dx_rows.to(x.dtype))
        if ctx.needs_input_grad[1]:
            dw = grouped_weight_grad(dy, x, offsets, gather, scatter, weight.shape, weight.dtype)
        return dx, dw, None, None, None

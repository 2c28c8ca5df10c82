"""The grouped expert GEMM in plain PyTorch: the CPU path and the reference of the kernels.

Each expert's rows are contiguous after the sort, so one `mm` per expert on a slice does the
work, written straight into a preallocated output (no concatenation). Forward and backward
are written out in an autograd Function: autograd through per-expert `weight[e]` selects
would build a zero-filled copy of the whole (E, out, in) gradient per expert.
"""

from __future__ import annotations

import torch


def expert_bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that received rows."""
    edges = offsets.tolist()
    return [(e, edges[e], edges[e + 1]) for e in range(len(edges) - 1) if edges[e + 1] > edges[e]]


def weight_grad_buffer(weight: torch.Tensor, bounds: list[tuple[int, int, int]]) -> torch.Tensor:
    """An uninitialised gradient of an (E, out, in) weight whose idle experts are zero: the
    others are written expert by expert (zero-filling the whole weight costs as much as a GEMM's
    bookkeeping on a CPU)."""
    grad = torch.empty_like(weight)
    busy = {e for e, _, _ in bounds}
    for e in range(weight.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def _forward(x, weight, bounds, gather, scatter, rows):
    source = x if gather is None else x.index_select(0, gather)
    out = source.new_empty(rows, weight.shape[1])
    for e, lo, hi in bounds:
        torch.mm(source[lo:hi], weight[e].t(), out=out[lo:hi])
    if scatter is None:
        return out, source
    return torch.empty_like(out).index_copy_(0, scatter, out), source


class GroupedLinearTorch(torch.autograd.Function):
    """y[scatter[i]] = x[gather[i]] @ weight[e(i)].T with explicit per-expert backward."""

    @staticmethod
    def forward(ctx, x, weight, offsets, gather, scatter):
        rows = gather.numel() if gather is not None else x.shape[0]
        bounds = expert_bounds(offsets)
        out, source = _forward(x, weight, bounds, gather, scatter, rows)
        ctx.bounds = bounds
        ctx.x_rows = x.shape[0]
        # the gathered rows (k copies of each token) only serve the weight gradient: frozen
        # experts (LoRA training) do not keep them
        ctx.save_for_backward(source if ctx.needs_input_grad[1] else None, weight, gather, scatter)
        return out

    @staticmethod
    def backward(ctx, dy):
        source, weight, gather, scatter = ctx.saved_tensors
        dy = dy if scatter is None else dy.index_select(0, scatter)
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            d_rows = dy.new_empty(dy.shape[0], weight.shape[2])
            for e, lo, hi in ctx.bounds:
                torch.mm(dy[lo:hi], weight[e], out=d_rows[lo:hi])
            if gather is None:
                dx = d_rows
            else:
                dx = d_rows.new_zeros(ctx.x_rows, d_rows.shape[1]).index_add_(0, gather, d_rows)
        if ctx.needs_input_grad[1]:
            dw = weight_grad_buffer(weight, ctx.bounds)
            for e, lo, hi in ctx.bounds:
                torch.mm(dy[lo:hi].t(), source[lo:hi], out=dw[e])
        return dx, dw, None, None, None


def grouped_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows i of expert e: y[scatter[i]] = x[gather[i]] @ weight[e].T (see grouped_linear)."""
    return GroupedLinearTorch.apply(x, weight, offsets, gather, scatter)

"""A whole expert MLP (up projection, gating, down projection) in plain PyTorch, expert by expert.

The CPU path of `expert_rows` without adapters. Two grouped GEMMs chained through autograd
stream every intermediate of all S rows through main memory: the (S, 2I) up projection, the
gated (S, I) rows, their gradients. Here each expert's rows go through the whole MLP at once,
so its intermediates are a few MB that stay in cache between the GEMMs and the gating (15% of
a CPU step at SmolLM2 width, against transformers 4.55's per-expert loop, which has the same
locality). Only the up projection is kept for backward: the gathered input rows are gathered
again and the gated rows recomputed (SwiGLU's with its gradient, one silu for both). The gating
stays any differentiable `gate_fn` (a kernel patched into the experts' `_apply_gate` included):
its backward then runs through autograd on one expert's block.
"""

from __future__ import annotations

import torch

from .gating import GateFn, swiglu, swiglu_and_grad
from .grouped_gemm_torch import expert_bounds, weight_grad_buffer


def _gated_and_grad(gate_fn: GateFn, up: torch.Tensor, d_gated: torch.Tensor):
    """gate_fn(up) recomputed, and the gradient of up given the gated rows' gradient."""
    if gate_fn is swiglu:
        return swiglu_and_grad(up, d_gated)
    with torch.enable_grad():
        up = up.detach().requires_grad_(True)
        gated = gate_fn(up)
    (d_up,) = torch.autograd.grad(gated, up, d_gated)
    return gated.detach(), d_up


def _rows(x: torch.Tensor, gather: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor:
    return x[lo:hi] if gather is None else x.index_select(0, gather[lo:hi])


class ExpertMLPTorch(torch.autograd.Function):
    """Sorted row i of expert e: y[scatter[i]] = gate_fn(x[gather[i]] @ W_up[e].T) @ W_down[e].T."""

    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, offsets, gather, scatter, gate_fn: GateFn):
        rows = gather.numel() if gather is not None else x.shape[0]
        bounds = expert_bounds(offsets)
        out = x.new_empty(rows, down_proj.shape[1])
        ups = []
        for e, lo, hi in bounds:
            up = _rows(x, gather, lo, hi) @ gate_up_proj[e].t()
            torch.mm(gate_fn(up), down_proj[e].t(), out=out[lo:hi])
            ups.append(up)
        ctx.bounds = bounds
        ctx.gate_fn = gate_fn
        ctx.save_for_backward(x, gate_up_proj, down_proj, gather, scatter, *ups)
        if scatter is None:
            return out
        return torch.empty_like(out).index_copy_(0, scatter, out)

    @staticmethod
    def backward(ctx, dy):
        x, gate_up_proj, down_proj, gather, scatter, *ups = ctx.saved_tensors
        need_x, need_gate_up, need_down = ctx.needs_input_grad[:3]
        dy = (dy if scatter is None else dy.index_select(0, scatter)).contiguous()
        dx = torch.zeros_like(x) if need_x else None
        d_gate_up = weight_grad_buffer(gate_up_proj, ctx.bounds) if need_gate_up else None
        d_down = weight_grad_buffer(down_proj, ctx.bounds) if need_down else None
        for (e, lo, hi), up in zip(ctx.bounds, ups):
            d_out = dy[lo:hi]
            gated, d_up = _gated_and_grad(ctx.gate_fn, up, d_out @ down_proj[e])
            if need_down:
                torch.mm(d_out.t(), gated, out=d_down[e])
            if need_gate_up:
                torch.mm(d_up.t(), _rows(x, gather, lo, hi), out=d_gate_up[e])
            if need_x:
                d_rows = d_up @ gate_up_proj[e]
                if gather is None:
                    dx[lo:hi] = d_rows
                else:
                    dx.index_add_(0, gather[lo:hi], d_rows)
        return dx, d_gate_up, d_down, None, None, None, None

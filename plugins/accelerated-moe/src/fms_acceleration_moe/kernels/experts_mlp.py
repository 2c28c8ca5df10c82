"""A mixture-of-experts MLP from grouped GEMMs: gated up projection, activation, down
projection, and the routing-weighted sum over each token's experts.

Weights use transformers' fused layout: gate_up_proj (E, 2I, H) with the gate half first,
down_proj (E, H, I). LoRA on either projection is a pair of grouped GEMMs through the same
gather/scatter (A: (E, r, in), B: (E, out, r)), so adapters on experts train in the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .grouped_gemm import grouped_linear
from .routing import group_by_expert


@dataclass(frozen=True)
class ExpertLoRA:
    """A low-rank update of one expert projection: W + scaling * B @ A, per expert."""

    a: torch.Tensor
    """(E, r, in)"""
    b: torch.Tensor
    """(E, out, r)"""
    scaling: float


def _projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    lora: ExpertLoRA | None,
) -> torch.Tensor:
    out = grouped_linear(x, weight, offsets, gather, scatter)
    if lora is None:
        return out
    # the rank-r activations stay in sorted order; only the B product lands at `scatter`
    low = grouped_linear(x, lora.a.to(x.dtype), offsets, gather, None)
    return out + lora.scaling * grouped_linear(low, lora.b.to(x.dtype), offsets, None, scatter)


def expert_rows(
    x: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """Each (token, expert) row through its expert's gated MLP, unweighted: (S, H), row
    scatter[i] (or i) for sorted row i."""
    hidden = _projection(x, gate_up_proj, offsets, gather, None, gate_up_lora)
    gate, up = hidden.chunk(2, dim=-1)
    return _projection(act_fn(gate) * up, down_proj, offsets, None, scatter, down_lora)


def combine(rows: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """(N, H): each token's k expert outputs (rows in (N, k) order) weighted by its router."""
    tokens, top_k = top_k_weights.shape
    weighted = rows.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1).to(rows.dtype)
    return weighted.sum(dim=1)


def experts_mlp(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gate_up_lora: ExpertLoRA | None = None,
    down_lora: ExpertLoRA | None = None,
) -> torch.Tensor:
    """The MoE MLP of N tokens (x: (N, H)) routed to k of E experts: (N, H)."""
    groups = group_by_expert(top_k_index, gate_up_proj.shape[0])
    rows = expert_rows(
        x,
        groups.offsets,
        groups.tokens,
        groups.pairs,
        gate_up_proj,
        down_proj,
        act_fn,
        gate_up_lora,
        down_lora,
    )
    return combine(rows, top_k_weights)

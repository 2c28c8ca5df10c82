"""A mixture-of-experts MLP from grouped GEMMs: gated up projection, gating, down projection,
and the routing-weighted sum over each token's experts.

Weights use transformers' fused layout: gate_up_proj (E, 2I, H) with the gate half first,
down_proj (E, H, I). The gating is a function of the packed (S, 2I) up projection (transformers
5 calls it `_apply_gate`), so a kernel that replaces it runs here too. LoRA on either
projection is a pair of grouped GEMMs through the same gather/scatter (A: (E, r, in), B:
(E, out, r)), so adapters on experts train in the kernels instead of being merged into a
materialised (E, out, in) weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from .expert_mlp_torch import ExpertMLPTorch
from .gating import GateFn
from .grouped_gemm import grouped_linear
from .routing import group_by_expert


@dataclass(frozen=True)
class ExpertLoRA:
    """A low-rank update of one expert projection: W + scaling * B @ A, per expert, on the
    output columns [columns[0], columns[1]) only (e.g. the gate half of gate_up_proj) or all."""

    a: torch.Tensor
    """(E, r, in), any strides"""
    b: torch.Tensor
    """(E, out, r), any strides; out is the width of `columns`"""
    scaling: float
    columns: tuple[int, int] | None = None
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
    """applied to the update's input rows (peft's lora_dropout); None: none"""


def _lora_update(
    x: torch.Tensor,
    lora: ExpertLoRA,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
) -> torch.Tensor:
    if lora.dropout is not None:
        # peft drops each (token, expert) row independently: drop the gathered rows
        x = lora.dropout(x if gather is None else x.index_select(0, gather))
        gather = None
    # the rank-r activations stay in sorted order; only the B product lands at `scatter`
    low = grouped_linear(x, lora.a.to(x.dtype), offsets, gather, None)
    return lora.scaling * grouped_linear(low, lora.b.to(x.dtype), offsets, None, scatter)


def _projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    loras: Sequence[ExpertLoRA],
) -> torch.Tensor:
    out = grouped_linear(x, weight, offsets, gather, scatter)
    width = out.shape[-1]
    for lora in loras:
        update = _lora_update(x, lora, offsets, gather, scatter)
        if lora.columns is not None:
            lo, hi = lora.columns
            update = F.pad(update, (lo, width - hi))
        out = out + update
    return out


def expert_rows(
    x: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None,
    scatter: torch.Tensor | None,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_fn: GateFn,
    gate_up_loras: Sequence[ExpertLoRA] = (),
    down_loras: Sequence[ExpertLoRA] = (),
) -> torch.Tensor:
    """Each (token, expert) row through its expert's gated MLP, unweighted: (S, H), row
    scatter[i] (or i) for sorted row i.

    Under autocast the rows and weights are cast once to its dtype, as autocast casts a
    Linear's, and the GEMMs run with autocast off: it would otherwise cast some of them and
    not the buffers they write into.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return expert_rows(
                x.to(dtype),
                offsets,
                gather,
                scatter,
                gate_up_proj.to(dtype),
                down_proj.to(dtype),
                gate_fn,
                gate_up_loras,
                down_loras,
            )
    if not (gate_up_loras or down_loras or use_triton(x, gate_up_proj, down_proj)):
        return ExpertMLPTorch.apply(x, gate_up_proj, down_proj, offsets, gather, scatter, gate_fn)
    hidden = _projection(x, gate_up_proj, offsets, gather, None, gate_up_loras)
    return _projection(gate_fn(hidden), down_proj, offsets, None, scatter, down_loras)


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
    gate_fn: GateFn,
    gate_up_loras: Sequence[ExpertLoRA] = (),
    down_loras: Sequence[ExpertLoRA] = (),
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
        gate_fn,
        gate_up_loras,
        down_loras,
    )
    return combine(rows, top_k_weights)

"""Tokens grouped by expert: the one sort every grouped expert GEMM works from.

A router picks `k` experts for each of `N` tokens. Flattening its (N, k) choice gives S = N * k
(token, expert) pairs; sorting them by expert (stably, so a token's pairs keep their order)
lays every expert's rows out contiguously. The grouped GEMMs read their inputs through
`tokens` (a fused gather) and write their outputs through `pairs` (a fused scatter) instead of
materialising padded per-expert copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGroups:
    """Routing of S = N * k (token, expert) pairs, sorted by expert."""

    experts: torch.Tensor
    """(S,) expert of each sorted pair, non-decreasing"""
    pairs: torch.Tensor
    """(S,) index of each sorted pair in the flattened (N, k) routing"""
    tokens: torch.Tensor
    """(S,) token (row of the input) of each sorted pair"""
    offsets: torch.Tensor
    """(E + 1,) int64 start of each expert's rows in sorted order; offsets[-1] == S"""
    top_k: int

    @property
    def num_experts(self) -> int:
        """E, the number of experts (local experts under expert parallelism)."""
        return self.offsets.numel() - 1

    @property
    def num_pairs(self) -> int:
        """S, the number of (token, expert) pairs."""
        return self.pairs.numel()

    def counts(self) -> torch.Tensor:
        """(E,) rows per expert."""
        return self.offsets[1:] - self.offsets[:-1]


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """(E + 1,) int64 exclusive prefix sum of per-expert row counts."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the (N, k) expert choice of a router into per-expert groups (no host sync)."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    experts, pairs = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    return ExpertGroups(
        experts=experts,
        pairs=pairs,
        tokens=torch.div(pairs, top_k, rounding_mode="floor"),
        offsets=offsets_from_counts(counts),
        top_k=top_k,
    )

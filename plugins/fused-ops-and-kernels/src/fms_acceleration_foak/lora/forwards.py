"""Replacement forwards that route peft LoRA layers through the fused LoRA functions.

Every forward re-checks the layer state on each call (adapter disabled, merged or switched, extra
arguments such as peft's `adapter_names`) and then falls back to the forward it replaced, so a
patched model always computes what the unpatched one would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..kernels.fused_lora import (
    fused_lora_linear,
    fused_lora_projections,
    fused_lora_swiglu_mlp,
)
from .peft_layers import LoRAProjectionSource

Forward = Callable[..., torch.Tensor]


class FusedProjectionGroup:
    """Projections of one input (Q, K, V) computed in one fused call, handed out one by one.

    The attention module calls q_proj(x), k_proj(x), v_proj(x) on the same tensor: the first
    call computes all of them and keeps the others until their own call with that same tensor.
    Any other call order or input still gets the right value, only less fused.
    """

    def __init__(
        self, sources: Mapping[str, LoRAProjectionSource], fallbacks: Mapping[str, Forward]
    ):
        self.sources = dict(sources)
        self.fallbacks = dict(fallbacks)
        self._input: torch.Tensor | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def _take(self, role: str) -> torch.Tensor:
        out = self._pending.pop(role)
        if not self._pending:
            self._input = None
        return out

    def forward_for(self, role: str) -> Forward:
        """The forward that replaces the projection `role` of this group."""
        source, fallback = self.sources[role], self.fallbacks[role]

        def forward(module: Any, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs:
                return fallback(x, *args, **kwargs)
            if self._input is x and role in self._pending:
                return self._take(role)
            if all(s.ready() for s in self.sources.values()):
                outputs = fused_lora_projections(x, [s() for s in self.sources.values()])
                self._pending = dict(zip(self.sources, outputs))
                self._input = x
                return self._take(role)
            if source.ready():
                return fused_lora_linear(x, source())
            return fallback(x)

        return forward


def fused_linear_forward(source: LoRAProjectionSource, fallback: Forward) -> Forward:
    """Forward for a single LoRA projection (the attention output, or a lone projection)."""

    def forward(module: Any, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not source.ready():
            return fallback(x, *args, **kwargs)
        return fused_lora_linear(x, source())

    return forward


def fused_mlp_forward(
    gate: LoRAProjectionSource,
    up: LoRAProjectionSource,
    down: LoRAProjectionSource,
    fallback: Forward,
) -> Forward:
    """Forward for a SwiGLU MLP module: down(silu(gate(x)) * up(x)) with LoRA on all three."""

    def forward(module: Any, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not (gate.ready() and up.ready() and down.ready()):
            return fallback(x, *args, **kwargs)
        return fused_lora_swiglu_mlp(x, gate(), up(), down())

    return forward

"""The gating of a packed (S, 2I) up projection: act_fn(gate) * up, gate half first.

`swiglu` is that gating with SiLU as one autograd Function. Through autograd the chunk into
halves, the activation and the product save the activation's output and end in a
concatenation of the two halves' gradients; here only the packed input is saved and both
gradients are written into one buffer (the same values: 9% of a CPU experts step, and one
(S, I) activation less in memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

GateFn = Callable[[torch.Tensor], torch.Tensor]


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of a packed (S, 2I) gate_up, gradient into one (S, 2I) buffer."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_grad(gate_up, d_out, F.silu(gate_up.chunk(2, dim=-1)[0]))


def _swiglu_grad(gate_up: torch.Tensor, d_out: torch.Tensor, silu_gate: torch.Tensor):
    """d loss / d gate_up from d loss / d (silu(gate) * up); silu_gate is overwritten."""
    gate, up = gate_up.chunk(2, dim=-1)
    d_gate_up = torch.empty_like(gate_up)
    d_gate, d_up = d_gate_up.chunk(2, dim=-1)
    torch.mul(d_out, silu_gate, out=d_up)
    torch.mul(d_out, up, out=silu_gate)
    torch.ops.aten.silu_backward.grad_input(silu_gate, gate, grad_input=d_gate)
    return d_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a packed (S, 2I) up projection: (S, I)."""
    return SwiGLU.apply(gate_up)


def swiglu_and_grad(
    gate_up: torch.Tensor, d_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """swiglu(gate_up) and the gradient of gate_up given the output's, d_out, with one silu:
    for a backward that recomputes the gated rows (autograd would compute silu twice)."""
    gate, up = gate_up.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    gated = silu_gate * up
    return gated, _swiglu_grad(gate_up, d_out, silu_gate)


def gated(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> GateFn:
    """The gating of a packed (S, 2I) gate_up output: act_fn(gate) * up."""

    def gate_fn(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up

    return gate_fn

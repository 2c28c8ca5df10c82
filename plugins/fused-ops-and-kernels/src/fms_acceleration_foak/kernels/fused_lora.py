"""Fused LoRA: frozen base matmul (weight dequantized on demand) plus the LoRA update, in one
autograd Function per attention-projection group, output projection or SwiGLU MLP.

As in Unsloth's LoRA_QKV / LoRA_O / LoRA_MLP, the dequantized base weight is never saved for
backward: backward dequantizes it again. Only the input, the small rank-r activations (x @ A^T)
and, for the MLP, the gate/up activations are saved. Base weights and biases are frozen: no
gradient is produced for them. Everything is computed in the input's dtype (the autocast dtype
when autocast is on), like the unfused layers; LoRA gradients are returned in the adapters' dtype.

Nothing here imports fms_acceleration, transformers, peft, bitsandbytes or gptqmodel: the base
weight arrives as a `FrozenBase` (lora/base_layers.py builds one from a base layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .swiglu import swiglu_backward, swiglu_forward


@dataclass(frozen=True)
class FrozenBase:
    """A frozen base linear layer: callables returning its (out, in) weight and its bias."""

    dequantize: Callable[[], torch.Tensor]
    get_bias: Callable[[], torch.Tensor | None]
    out_features: int

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen bias (read at call time, so a re-assigned layer bias is seen)."""
        return self.get_bias()

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as an (out_features, in_features) tensor of `dtype`."""
        return self.dequantize().to(dtype)


@dataclass(frozen=True)
class LoRAProjection:
    """One projection y = x @ W^T + bias + scaling * (x @ A^T) @ B^T with W frozen."""

    base: FrozenBase
    lora_A: torch.Tensor  # (r, in_features)
    lora_B: torch.Tensor  # (out_features, r)
    scaling: float


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _project(
    x2: torch.Tensor, base: FrozenBase, a: torch.Tensor, b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base matmul plus LoRA on a 2-D input; returns the output and x @ A^T (saved for backward)."""
    dtype = x2.dtype
    y = x2 @ base.weight(dtype).t()
    bias = base.bias
    if bias is not None:
        y = y + bias.to(dtype)
    xa = x2 @ a.to(dtype).t()
    y.addmm_(xa, b.to(dtype).t(), alpha=scaling)
    return y, xa


def _project_input_grad(
    dy: torch.Tensor, dy_b: torch.Tensor, base: FrozenBase, a: torch.Tensor, scaling: float
) -> torch.Tensor:
    """dx of one projection: dy @ W + scaling * (dy @ B) @ A."""
    dx = dy @ base.weight(dy.dtype)
    dx.addmm_(dy_b, a.to(dy.dtype), alpha=scaling)
    return dx


def _lora_grads(
    dy: torch.Tensor,
    dy_b: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    want_a: bool,
    want_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dA, dB) of one projection, in the adapters' dtypes."""
    da = (dy_b.t() @ x2).mul_(scaling).to(a.dtype) if want_a else None
    db = (dy.t() @ xa).mul_(scaling).to(b.dtype) if want_b else None
    return da, db


def _project_backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor,
    base: FrozenBase,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dA, dB) of one projection for a 2-D upstream gradient dy."""
    want_x, want_a, want_b = want
    dy_b = dy @ b.to(dy.dtype)  # (N, r): shared by dA and dx
    da, db = _lora_grads(dy, dy_b, x2, xa, a, b, scaling, want_a, want_b)
    dx = _project_input_grad(dy, dy_b, base, a, scaling) if want_x else None
    return dx, da, db


class _FusedLoRAProjections(torch.autograd.Function):
    """Several projections of one input (Q, K, V; or a single O) with their LoRA adapters."""

    @staticmethod
    def forward(ctx, x, bases, scalings, *lora_weights):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            outputs, xas = [], []
            for i, (base, scaling) in enumerate(zip(bases, scalings)):
                a, b = lora_weights[2 * i], lora_weights[2 * i + 1]
                y, xa = _project(x2, base, a, b, scaling)
                outputs.append(y.view(*x.shape[:-1], base.out_features))
                xas.append(xa)
        ctx.bases, ctx.scalings, ctx.x_shape, ctx.x_dtype = bases, scalings, x.shape, x.dtype
        ctx.save_for_backward(x2, *xas, *lora_weights)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        n = len(ctx.bases)
        saved = ctx.saved_tensors
        x2, xas, lora_weights = saved[0], saved[1 : 1 + n], saved[1 + n :]
        want_x = ctx.needs_input_grad[0]
        dx = None
        grads_ab: list[torch.Tensor | None] = []
        with torch.autocast(x2.device.type, enabled=False):
            for i, (base, scaling, dy) in enumerate(zip(ctx.bases, ctx.scalings, grad_outputs)):
                a, b = lora_weights[2 * i], lora_weights[2 * i + 1]
                if dy is None:
                    grads_ab += [None, None]
                    continue
                want = (want_x, ctx.needs_input_grad[3 + 2 * i], ctx.needs_input_grad[4 + 2 * i])
                dy2 = dy.reshape(-1, base.out_features).to(x2.dtype)
                dxi, da, db = _project_backward(dy2, x2, xas[i], base, a, b, scaling, want)
                grads_ab += [da, db]
                if dxi is not None:
                    dx = dxi if dx is None else dx.add_(dxi)
        if dx is not None:
            dx = dx.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, *grads_ab)


class _FusedLoRASwiGLUMLP(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on gate, up and down."""

    @staticmethod
    def forward(ctx, x, bases, scalings, ga, gb, ua, ub, da, db):
        dtype = _compute_dtype(x)
        g_base, u_base, d_base = bases
        g_s, u_s, d_s = scalings
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            gate, xa_g = _project(x2, g_base, ga, gb, g_s)
            up, xa_u = _project(x2, u_base, ua, ub, u_s)
            h = swiglu_forward(gate, up)
            out, ha = _project(h, d_base, da, db, d_s)
            del h  # recomputed by the backward's SwiGLU kernel
        ctx.bases, ctx.scalings, ctx.x_shape, ctx.x_dtype = bases, scalings, x.shape, x.dtype
        ctx.save_for_backward(x2, gate, up, xa_g, xa_u, ha, ga, gb, ua, ub, da, db)
        return out.view(*x.shape[:-1], d_base.out_features)

    @staticmethod
    def backward(ctx, dout):
        x2, gate, up, xa_g, xa_u, ha, ga, gb, ua, ub, da, db = ctx.saved_tensors
        g_base, u_base, d_base = ctx.bases
        g_s, u_s, d_s = ctx.scalings
        need = ctx.needs_input_grad
        dtype = x2.dtype
        with torch.autocast(x2.device.type, enabled=False):
            dout2 = dout.reshape(-1, d_base.out_features).to(dtype)
            dout_b = dout2 @ db.to(dtype)
            dh = _project_input_grad(dout2, dout_b, d_base, da, d_s)
            # one pass: h (for the down projection's dA), dgate and dup, in the compute dtype
            h, dgate, dup = swiglu_backward(dh, gate, up, want_h=need[7])
            del dh
            d_da, d_db = _lora_grads(dout2, dout_b, h, ha, da, db, d_s, need[7], need[8])
            del h
            dx_g, d_ga, d_gb = _project_backward(
                dgate, x2, xa_g, g_base, ga, gb, g_s, (need[0], need[3], need[4])
            )
            dx_u, d_ua, d_ub = _project_backward(
                dup, x2, xa_u, u_base, ua, ub, u_s, (need[0], need[5], need[6])
            )
        dx = dx_g.add_(dx_u).view(ctx.x_shape).to(ctx.x_dtype) if need[0] else None
        return dx, None, None, d_ga, d_gb, d_ua, d_ub, d_da, d_db


def fused_lora_projections(
    x: torch.Tensor, projections: Sequence[LoRAProjection]
) -> tuple[torch.Tensor, ...]:
    """All projections of `x` (e.g. Q, K, V) with their LoRA updates, in one autograd node."""
    if not projections:
        raise ValueError("fused_lora_projections needs at least one projection")
    bases = tuple(p.base for p in projections)
    scalings = tuple(float(p.scaling) for p in projections)
    weights = [t for p in projections for t in (p.lora_A, p.lora_B)]
    return _FusedLoRAProjections.apply(x, bases, scalings, *weights)


def fused_lora_linear(x: torch.Tensor, projection: LoRAProjection) -> torch.Tensor:
    """One projection of `x` (e.g. the attention output O) with its LoRA update."""
    return fused_lora_projections(x, (projection,))[0]


def fused_lora_swiglu_mlp(
    x: torch.Tensor, gate: LoRAProjection, up: LoRAProjection, down: LoRAProjection
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), each projection with its LoRA update, in one autograd node."""
    bases = (gate.base, up.base, down.base)
    scalings = (float(gate.scaling), float(up.scaling), float(down.scaling))
    return _FusedLoRASwiGLUMLP.apply(
        x,
        bases,
        scalings,
        gate.lora_A,
        gate.lora_B,
        up.lora_A,
        up.lora_B,
        down.lora_A,
        down.lora_B,
    )

"""Rotary position embedding of q and k: Triton forward and backward in one autograd Function."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import launch, use_triton
from .reference import rope_reference


@triton.jit
def _rope_rotate(
    X,
    OUT,
    cos1,
    cos2,
    sin1,
    sin2,
    b,
    s,
    n_heads,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_ob,
    stride_oh,
    stride_os,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_base = X + b * stride_xb + s * stride_xs + heads * stride_xh + dims
    o_base = OUT + b * stride_ob + s * stride_os + heads * stride_oh + dims
    x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the rotation: rotate_half^T(g) = cat(g2, -g1).
        o1 = x1 * cos1 + x2 * sin2
        o2 = x2 * cos2 - x1 * sin1
    else:
        o1 = x1 * cos1 - x2 * sin1
        o2 = x2 * cos2 + x1 * sin2
    tl.store(o_base, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + half, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    seq_len,
    n_q_heads,
    n_k_heads,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_qob,
    stride_qoh,
    stride_qos,
    stride_kob,
    stride_koh,
    stride_kos,
    stride_cb,
    stride_cs,
    half,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (batch, position): cos/sin for that position are loaded once for all heads.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    c_base = b * stride_cb + s * stride_cs + dims
    cos1 = tl.load(COS + c_base, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + c_base + half, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + c_base, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + c_base + half, mask=dmask, other=0.0).to(tl.float32)
    _rope_rotate(
        Q, QO, cos1, cos2, sin1, sin2, b, s, n_q_heads, stride_qb, stride_qh, stride_qs,
        stride_qob, stride_qoh, stride_qos, half, BLOCK_QH, BLOCK_D, BACKWARD,
    )  # fmt: skip
    _rope_rotate(
        K, KO, cos1, cos2, sin1, sin2, b, s, n_k_heads, stride_kb, stride_kh, stride_ks,
        stride_kob, stride_koh, stride_kos, half, BLOCK_KH, BLOCK_D, BACKWARD,
    )  # fmt: skip


def _launch(
    q, k, cos, sin, backward: bool, q_dtype: torch.dtype, k_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, H, S, D] views (any head/seq strides, unit last stride); cos, sin: [B, S, D].

    Outputs have q's and k's layout and the dtypes asked for; the arithmetic is fp32.
    """
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    # empty_like keeps q's memory layout, as transformers' elementwise rotation does.
    qo, ko = torch.empty_like(q, dtype=q_dtype), torch.empty_like(k, dtype=k_dtype)
    launch(
        _rope_kernel, (bsz * seq,), q.device,
        q, k, qo, ko, cos, sin, seq, n_q, n_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), dim // 2,
        BLOCK_QH=triton.next_power_of_2(n_q), BLOCK_KH=triton.next_power_of_2(n_k),
        BLOCK_D=triton.next_power_of_2(dim // 2), BACKWARD=backward, num_warps=4,
    )  # fmt: skip
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in one launch; cos and sin (rotary buffers) receive no gradient.

    Outputs take the dtype transformers' `q * cos + rotate_half(q) * sin` gives: q's dtype
    promoted with cos's (under autocast fp32 cos/sin make fp32 q/k); gradients return in the
    inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim: int):
        if unsqueeze_dim == 2:  # [B, S, H, D] layout: view it as [B, H, S, D]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        table_dtype = torch.promote_types(cos.dtype, sin.dtype)
        q_out, k_out = (torch.promote_types(t.dtype, table_dtype) for t in (q, k))
        qo, ko = _launch(q, k, cos, sin, False, q_out, k_out)
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        ctx.dtypes = (q.dtype, k.dtype)
        if unsqueeze_dim == 2:
            qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        if ctx.unsqueeze_dim == 2:
            dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
        gq, gk = _launch(dq, dk, cos, sin, True, *ctx.dtypes)
        if ctx.unsqueeze_dim == 2:
            gq, gk = gq.transpose(1, 2), gk.transpose(1, 2)
        return gq, gk, None, None, None


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) with a Triton kernel where available."""
    usable = (
        unsqueeze_dim in (1, 2)
        and q.dim() == 4
        and k.dim() == 4
        and cos.dim() == 3
        and q.shape[-1] % 2 == 0
        and cos.shape[-1] == q.shape[-1]
        and not (cos.requires_grad or sin.requires_grad)
    )
    if usable and use_triton(q, k, cos, sin):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)
    return rope_reference(q, k, cos, sin, unsqueeze_dim)

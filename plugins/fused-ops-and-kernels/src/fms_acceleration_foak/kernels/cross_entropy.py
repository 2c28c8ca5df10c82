"""Token cross-entropy over a chunked vocabulary: Triton kernels in one autograd Function.

Each program owns one row of logits and walks the vocabulary in blocks with an online
log-sum-exp, so no row ever has to fit in one block and no softmax is materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import num_warps_for, use_triton
from .reference import cross_entropy_reference

MAX_VOCAB_BLOCK = 8192


@triton.jit
def _ce_loss_kernel(
    LOGITS, stride_l, TARGET, LOSS, LSE, n_cols, ignore_index, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    target = tl.load(TARGET + row)
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    ignored = target == ignore_index
    x_target = tl.load(base + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - x_target))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_grad_kernel(
    LOGITS,
    stride_l,
    GRAD,
    stride_g,
    TARGET,
    LSE,
    SCALE,
    n_cols,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    # d loss_row / d logits = softmax - onehot(target); GRAD may alias LOGITS (fused path).
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGET + row)
    lse = tl.load(LSE + row)
    keep = tl.where(target == ignore_index, 0.0, 1.0)
    if HAS_SCALE:
        keep = keep * tl.load(SCALE).to(tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(LOGITS + row * stride_l + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * keep
        tl.store(GRAD + row * stride_g + cols, g.to(GRAD.dtype.element_ty), mask=mask)


def vocab_block(n_cols: int) -> int:
    """Block of vocabulary entries one program processes per step."""
    return min(triton.next_power_of_2(n_cols), MAX_VOCAB_BLOCK)


def ce_loss_rows(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (0 where ignored) and log-sum-exp, fp32, of 2-D logits with unit stride."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = vocab_block(n_cols)
    _ce_loss_kernel[(n_rows,)](
        logits, logits.stride(0), target, loss, lse, n_cols, ignore_index,
        BLOCK_V=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return loss, lse


def ce_grad_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write (softmax - onehot) * scale into out (may alias logits); ignored rows get 0."""
    n_rows, n_cols = logits.shape
    block = vocab_block(n_cols)
    _ce_grad_kernel[(n_rows,)](
        logits, logits.stride(0), out, out.stride(0), target, lse,
        scale if scale is not None else lse, n_cols, ignore_index,
        BLOCK_V=block, HAS_SCALE=scale is not None, num_warps=num_warps_for(block),
    )  # fmt: skip
    return out


def loss_divisor(
    target: torch.Tensor, ignore_index: int, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    """Normaliser of the summed loss: num_items_in_batch when given, else the non-ignored count."""
    if num_items_in_batch is None:
        return (target != ignore_index).sum().to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(device=target.device, dtype=torch.float32)
    return torch.tensor(float(num_items_in_batch), device=target.device)


class CrossEntropyFunction(torch.autograd.Function):
    """Loss = sum of row losses / divisor; the backward recomputes softmax from the saved lse."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index: int, divisor: torch.Tensor):
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        loss_rows, lse = ce_loss_rows(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse, divisor)
        ctx.ignore_index = ignore_index
        return loss_rows.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, lse, divisor = ctx.saved_tensors
        scale = (grad_output.to(torch.float32) / divisor).reshape(1)
        grad = ce_grad_rows(logits, target, lse, ctx.ignore_index, torch.empty_like(logits), scale)
        return grad, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of [N, V] logits: mean over non-ignored rows, or sum / num_items_in_batch."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy expects logits [N, V] and target [N], got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if use_triton(logits, target):
        divisor = loss_divisor(target, ignore_index, num_items_in_batch)
        return CrossEntropyFunction.apply(logits, target, ignore_index, divisor)
    return cross_entropy_reference(logits, target, ignore_index, num_items_in_batch)

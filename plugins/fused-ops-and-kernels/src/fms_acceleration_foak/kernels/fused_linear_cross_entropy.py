"""Fused lm_head projection + cross-entropy that never materialises the full [tokens, vocab] logits.

Tokens are processed in chunks; for each chunk the logits are computed, turned in place into
d loss / d logits, and immediately contracted into the hidden-state and weight gradients. The
gradients are therefore computed in the forward and only scaled by grad_output in the backward.
On CUDA (or TRITON_INTERPRET=1) the per-chunk softmax/gradient runs in the cross-entropy Triton
kernels; elsewhere in PyTorch, which still saves the memory of the full logits.
"""

from __future__ import annotations

import torch
import triton

from ._dispatch import use_triton
from .cross_entropy import ce_grad_rows, ce_loss_rows, loss_divisor


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk of logits holds about as many elements as the hidden."""
    chunks = triton.cdiv(vocab, hidden)
    return max(1, triton.next_power_of_2(triton.cdiv(n_tokens, chunks)))


def _chunk_loss_and_grad_torch(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses and (in place, in logits' dtype) d loss_row / d logits for one chunk."""
    logits32 = logits.float()  # no copy when logits are already fp32
    ignored = target == ignore_index
    safe_target = target.masked_fill(ignored, 0)
    lse = torch.logsumexp(logits32, dim=-1)
    x_target = logits32.gather(1, safe_target[:, None]).squeeze(1)
    loss_rows = (lse - x_target).masked_fill(ignored, 0.0)
    if need_grad:
        grad = logits32.sub_(lse[:, None]).exp_()
        grad[torch.arange(grad.shape[0], device=grad.device), safe_target] -= 1.0
        grad.masked_fill_(ignored[:, None], 0.0)
        if grad is not logits:
            logits.copy_(grad)
    return loss_rows, logits


def chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    need_grads: tuple[bool, bool, bool],
    chunk_size: int | None = None,
    triton_ce: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed loss and the unscaled gradients (hidden, weight, bias) of sum(row losses)."""
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(n_tokens, n_hidden, vocab)
    need_gh, need_gw, need_gb = need_grads
    grad_hidden = torch.empty_like(hidden) if need_gh else None
    # Accumulated in the weight's dtype with in-place addmm (no [V, H] temporaries per chunk).
    grad_weight = torch.zeros_like(weight) if need_gw else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_gb else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    need_any = need_gh or need_gw or need_gb
    for start in range(0, n_tokens, chunk):
        h = hidden[start : start + chunk]
        t = target[start : start + chunk]
        logits = h @ weight.t()
        if bias is not None:
            logits += bias
        if triton_ce:
            loss_rows, lse = ce_loss_rows(logits, t, ignore_index)
            if need_any:
                ce_grad_rows(logits, t, lse, ignore_index, out=logits)
        else:
            loss_rows, logits = _chunk_loss_and_grad_torch(logits, t, ignore_index, need_any)
        total += loss_rows.sum()
        if need_gh:
            torch.mm(logits, weight, out=grad_hidden[start : start + chunk])
        if need_gw:
            grad_weight.addmm_(logits.t(), h)
        if need_gb:
            grad_bias += logits.sum(0, dtype=torch.float32)
        del logits
    return total, grad_hidden, grad_weight, grad_bias


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """sum_rows CE(hidden @ weight.T + bias, target) / divisor; gradients made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, divisor, chunk_size, triton_ce):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3],
        )
        total, gh, gw, gb = chunked_loss_and_grads(
            hidden, weight, target, bias, ignore_index, need, chunk_size, triton_ce
        )
        ctx.save_for_backward(divisor)
        ctx.grads = (gh, gw, gb)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        (divisor,) = ctx.saved_tensors
        gh, gw, gb = ctx.grads
        ctx.grads = None
        scale = grad_output.to(torch.float32) / divisor
        # In place: these buffers were allocated for this backward only.
        gh = gh.mul_(scale.to(gh.dtype)) if gh is not None else None
        gw = gw.mul_(scale.to(gw.dtype)) if gw is not None else None
        gb = gb.mul_(scale).to(ctx.bias_dtype) if gb is not None else None
        return gh, gw, None, gb, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CE(hidden @ weight.T + bias, target) without full logits; hidden [..., H], target [...]."""
    n_hidden = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != n_hidden:
        raise ValueError(
            f"weight must be [vocab, {n_hidden}] to match hidden [..., {n_hidden}], "
            f"got {tuple(weight.shape)}"
        )
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    hidden2 = hidden.reshape(-1, n_hidden)
    target2 = target.reshape(-1)
    divisor = loss_divisor(target2, ignore_index, num_items_in_batch)
    triton_ce = use_triton(hidden2, weight)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast would do to lm_head's F.linear, done once outside the Function
        dtype = torch.get_autocast_dtype(device_type)
        hidden2, weight = hidden2.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target2, bias, ignore_index, divisor, chunk_size, triton_ce
        )

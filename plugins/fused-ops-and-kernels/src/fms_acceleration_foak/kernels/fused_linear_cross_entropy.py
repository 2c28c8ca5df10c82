"""Fused lm_head projection + cross-entropy that never materialises the full [tokens, vocab] logits.

Only the rows whose label is not ignore_index are computed (`scored_rows`). They are processed
in chunks; for each chunk the logits are computed, turned in place into d loss / d logits
(already divided by the loss divisor), and immediately contracted into the hidden-state and
weight gradients. The gradients are therefore computed in the forward and only scaled by
grad_output in the backward.

Per chunk: one matmul for the logits (bias fused through addmm), one kernel for the row losses
and the gradient in place, one matmul into the hidden-state gradient and one accumulating
matmul into the weight gradient, which is kept in fp32 for the whole loop (a bf16 running sum
would round every chunk's contribution). The row losses are summed once at the end.

That loop (chunked_loss_and_grads) is the CUDA path: the per-chunk softmax/gradient runs in the
cross-entropy Triton kernel (also under TRITON_INTERPRET=1, on CPU tensors), or in PyTorch when
backend("torch") is forced. CPU tensors otherwise take fused_linear_cross_entropy_torch, the
same computation with chunk sizes and buffers chosen for a CPU.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton

from . import fused_linear_cross_entropy_torch as torch_path
from ._dispatch import use_triton
from .cross_entropy import ce_loss_and_grad_rows, check_targets, loss_divisor
from .fused_linear_cross_entropy_torch import loss_and_grad_rows_, scatter_rows

logger = logging.getLogger(__name__)

MIN_CHUNK_CUDA = 1024  # rows of a chunk on a GPU: at least a few waves of CE programs


def default_chunk_size(
    n_tokens: int, hidden: int, vocab: int, weight_grad: bool = True, on_cuda: bool = True
) -> int:
    """Tokens per chunk.

    By default a chunk of logits holds about as many elements as the hidden states. On a GPU
    a chunk has at least MIN_CHUNK_CUDA rows, and with a weight gradient about `hidden` rows:
    the fp32 accumulator is read and written once per chunk, and a contraction over fewer than
    ~hidden tokens makes that accumulating GEMM memory-bound (at 16k tokens x 4096 x 128256,
    1024-token chunks would move 67 GB of accumulator, 4096-token chunks 17 GB). Elsewhere
    (the PyTorch path on CPU) chunks stay small: memory matters more there than GEMM shape.
    """
    chunks = triton.cdiv(vocab, hidden)
    chunk = triton.next_power_of_2(triton.cdiv(n_tokens, chunks))
    if on_cuda:
        chunk = max(chunk, MIN_CHUNK_CUDA)
        if weight_grad:
            chunk = max(chunk, triton.next_power_of_2(hidden))
    return max(1, min(chunk, triton.next_power_of_2(n_tokens)))


def accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 and a, b possibly fp16/bf16, without a bf16 running sum.

    On CUDA one cuBLAS call with an fp32 output (addmm's out_dtype); where that overload is
    missing, the product is made in fp32 and added.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError) as err:
            _note_fallback("addmm(out_dtype=float32)", str(err))
        try:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except (RuntimeError, TypeError, NotImplementedError) as err:
            _note_fallback("mm(out_dtype=float32)", str(err))
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@functools.cache
def _note_fallback(what: str, err: str) -> None:
    logger.info("fused linear CE: %s unavailable (%s); using a slower fp32 path", what, err)


def chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    divisor: torch.Tensor,
    need_grads: tuple[bool, bool, bool],
    chunk_size: int | None = None,
    triton_ce: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss (sum of row losses / divisor) and its gradients (hidden, weight, bias)."""
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    need_gh, need_gw, need_gb = need_grads
    chunk = chunk_size or default_chunk_size(n_tokens, n_hidden, vocab, need_gw, hidden.is_cuda)
    device = hidden.device
    grad_hidden = torch.empty_like(hidden) if need_gh else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_gw else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_gb else None
    loss_rows = torch.empty(n_tokens, dtype=torch.float32, device=device)
    scale = (1.0 / divisor).reshape(1)
    need_any = need_gh or need_gw or need_gb
    weight_t = weight.t()
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        t = target[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else h @ weight_t
        if triton_ce:
            ce_loss_and_grad_rows(logits, t, ignore_index, loss_rows[start:end], scale, need_any)
        else:
            loss_and_grad_rows_(logits, t, ignore_index, scale, loss_rows[start:end], need_any)
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            accumulate_matmul(grad_weight, logits.t(), h)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
        del logits
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return loss_rows.sum() / divisor, grad_hidden, grad_weight, grad_bias


def scored_rows(target: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The index of the rows whose label counts; None to keep them all (none or all ignored).

    An ignored row adds nothing to the loss and gets a zero gradient, so its [vocab] logits need
    not be computed: in instruction data the prompt's labels are ignore_index, often half the
    tokens or more. The Function gathers the rows and scatters their gradient back, zeros in
    the ignored rows. The index's length sizes the GEMMs, so on a GPU this is the loss's one
    host sync (the label check makes none): it buys skipping the ignored rows' GEMMs."""
    index = (target != ignore_index).nonzero().squeeze(1)
    return None if index.numel() in (0, target.numel()) else index


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """sum_rows CE(hidden @ weight.T + bias, target) / divisor; gradients made in the forward."""

    @staticmethod
    def forward(
        ctx, hidden, weight, target, bias, rows, ignore_index, divisor, chunk_size, triton_ce
    ):
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[3],
        )
        if triton_ce or hidden.device.type != "cpu":
            h, t = hidden, target
            if rows is not None:
                h, t = hidden.index_select(0, rows), target.index_select(0, rows)
            loss, gh, gw, gb = chunked_loss_and_grads(
                h, weight, t, bias, ignore_index, divisor, need, chunk_size, triton_ce
            )
        else:
            loss, gh, gw, gb = torch_path.loss_and_grads(
                hidden, weight, target, bias, ignore_index, divisor, need, chunk_size, rows
            )
        if gh is not None and rows is not None:  # zeros in the rows left out
            gh = scatter_rows(gh, rows, hidden.shape[0])
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.grads
        ctx.grads = None
        # grad_output is usually exactly 1 (the loss backpropagated as it is). Reading it is free
        # on a CPU, where a multiply by 1 would be a pass over the weight gradient; on a GPU the
        # read would be a host sync, which costs more than the in-place multiply.
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            # in place: these buffers were allocated for this backward only
            for g in grads:
                if g is not None:
                    g.mul_(grad_output.to(g.dtype))
        return grads[0], grads[1], None, grads[2], None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """CE(hidden @ weight.T + bias, target) without full logits; hidden [..., H], target [...].

    Labels must be ignore_index or in [0, vocab): anything else is a ValueError, as in torch.
    """
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
    check_targets(target2, weight.shape[0], ignore_index)
    divisor = loss_divisor(target2, ignore_index, num_items_in_batch)
    rows = scored_rows(target2, ignore_index)
    triton_ce = use_triton(hidden2, weight)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # what autocast would do to lm_head's F.linear, done once outside the Function
        dtype = torch.get_autocast_dtype(device_type)
        hidden2, weight = hidden2.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type, enabled=False):
        return FusedLinearCrossEntropyFunction.apply(
            hidden2, weight, target2, bias, rows, ignore_index, divisor, chunk_size, triton_ce
        )

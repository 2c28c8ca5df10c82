"""Token cross-entropy over a chunked vocabulary: Triton kernels in one autograd Function.

Each program owns one row of logits and walks the vocabulary in blocks with an online
log-sum-exp, so no row ever has to fit in one block and no softmax is materialised. Logits of
any float dtype go straight in (bf16 logits are read as bf16 and converted in registers), and
the gradient comes back in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import launch, num_warps_for, use_triton
from .reference import cross_entropy_reference

MAX_VOCAB_BLOCK = 8192


@triton.jit
def _row_lse(base, n_cols, BLOCK_V: tl.constexpr):
    """Log-sum-exp of one row in fp32, one pass over the vocabulary."""
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _row_target(TARGET, row, n_cols, ignore_index):
    """(target, keep) of one row: keep is 0 for ignore_index and for labels outside [0, V).

    Labels outside the vocabulary are refused before launch (check_targets; on a GPU by a
    device-side assert that fires later); the clamp keeps the kernel from reading out of bounds
    in the meantime.
    """
    target = tl.load(TARGET + row)
    valid = (target != ignore_index) & (target >= 0) & (target < n_cols)
    return tl.where(valid, target, 0), valid


@triton.jit
def _row_loss(base, TARGET, LOSS, row, n_cols, ignore_index, BLOCK_V: tl.constexpr):
    """Store the loss of the row of logits at `base` (0 where ignored); return (target, keep,
    lse) for its gradient."""
    target, valid = _row_target(TARGET, row, n_cols, ignore_index)
    lse = _row_lse(base, n_cols, BLOCK_V)
    x_target = tl.load(base + target).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_target, 0.0))
    return target, valid, lse


@triton.jit
def _store_row_grad(src, dst, target, lse, scale, n_cols, BLOCK_V: tl.constexpr):
    """(softmax - onehot(target)) * scale of the row of logits at `src`, written to `dst` in
    its dtype; `dst` may be `src`."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(dst + cols, g.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _ce_loss_kernel(
    LOGITS, stride_l, TARGET, LOSS, LSE, n_cols, ignore_index, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    _, _, lse = _row_loss(LOGITS + row * stride_l, TARGET, LOSS, row, n_cols, ignore_index, BLOCK_V)
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
    # d loss_row / d logits = softmax - onehot(target), times SCALE; GRAD may alias LOGITS.
    row = tl.program_id(0).to(tl.int64)
    target, valid = _row_target(TARGET, row, n_cols, ignore_index)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(SCALE).to(tl.float32)
    _store_row_grad(
        LOGITS + row * stride_l,
        GRAD + row * stride_g,
        target,
        tl.load(LSE + row),
        tl.where(valid, scale, 0.0),
        n_cols,
        BLOCK_V,
    )


@triton.jit
def _ce_loss_and_grad_kernel(
    LOGITS,
    stride_l,
    TARGET,
    LOSS,
    SCALE,
    n_cols,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    # Fused linear CE: the row loss, then (softmax - onehot) * SCALE over the logits in place.
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    target, valid, lse = _row_loss(base, TARGET, LOSS, row, n_cols, ignore_index, BLOCK_V)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(SCALE).to(tl.float32), 0.0)
        _store_row_grad(base, base, target, lse, scale, n_cols, BLOCK_V)


def vocab_block(n_cols: int) -> int:
    """Block of vocabulary entries one program processes per step."""
    return min(triton.next_power_of_2(n_cols), MAX_VOCAB_BLOCK)


def check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Refuse labels that are neither ignore_index nor in [0, n_classes), as torch does.

    On a CPU a ValueError names the first one (reading the labels costs nothing there). On a
    GPU reading them would be a host sync on every loss call, so the check is a device-side
    assert instead: it fails the next synchronising call, as torch's own label check does (run
    with CUDA_LAUNCH_BLOCKING=1 to see where). The kernels clamp such labels either way.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if target.device.type != "cpu":
        torch._assert_async(
            ~bad.any(),
            f"cross_entropy: a target label outside [0, {n_classes}) that is not "
            f"ignore_index={ignore_index}",
        )
        return
    if bool(bad.any()):
        where = bad.nonzero().flatten()
        first = int(where[0])
        raise ValueError(
            f"cross_entropy: {where.numel()} target label(s) outside [0, {n_classes}) that are "
            f"not ignore_index={ignore_index}; the first is {int(target[first])} at flat "
            f"position {first}. Labels must be token ids of the vocabulary or ignore_index."
        )


def ce_loss_rows(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (0 where ignored) and log-sum-exp, fp32, of 2-D logits with unit stride."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = vocab_block(n_cols)
    launch(
        _ce_loss_kernel, (n_rows,), logits.device,
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
    launch(
        _ce_grad_kernel, (n_rows,), logits.device,
        logits, logits.stride(0), out, out.stride(0), target, lse,
        scale if scale is not None else lse, n_cols, ignore_index,
        BLOCK_V=block, HAS_SCALE=scale is not None, num_warps=num_warps_for(block),
    )  # fmt: skip
    return out


def ce_loss_and_grad_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    loss_out: torch.Tensor,
    scale: torch.Tensor,
    write_grad: bool,
) -> None:
    """Row losses into loss_out; with write_grad, logits become (softmax - onehot) * scale."""
    n_rows, n_cols = logits.shape
    block = vocab_block(n_cols)
    launch(
        _ce_loss_and_grad_kernel, (n_rows,), logits.device,
        logits, logits.stride(0), target, loss_out, scale, n_cols, ignore_index,
        BLOCK_V=block, WRITE_GRAD=write_grad, num_warps=num_warps_for(block),
    )  # fmt: skip


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
    """Cross-entropy of [N, V] logits: mean over non-ignored rows, or sum / num_items_in_batch.

    Labels must be ignore_index or in [0, V): anything else is a ValueError, as in torch.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy expects logits [N, V] and target [N], got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if use_triton(logits, target):
        check_targets(target, logits.shape[1], ignore_index)
        divisor = loss_divisor(target, ignore_index, num_items_in_batch)
        return CrossEntropyFunction.apply(logits, target, ignore_index, divisor)
    return cross_entropy_reference(logits, target, ignore_index, num_items_in_batch)

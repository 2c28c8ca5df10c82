"""Fused linear cross-entropy in PyTorch: the CPU path, and the row step of the CUDA fallback.

The CUDA path (fused_linear_cross_entropy.chunked_loss_and_grads) is shaped by the GPU; on a
CPU other facts decide the speed (measured on 2 Xeon cores with AMX, one thread each):

- A matmul is efficient only on a hundred rows or more at a time: bf16 logits of 8 rows ran at
  60 GFLOP/s, of 512 rows at about 700 (AMX), fp32 at 15 and 160 (fp32 already from 256
  rows). Chunks are therefore large (chunk_rows), where the CUDA-tuned size gave 8 rows at
  vocab 128256.
- A buffer above glibc's mmap threshold (32 MB) is page-faulted in on first touch every time it
  is allocated (about 0.4 ms per MB here), so each buffer is allocated once per call and every
  matmul writes into it (`out=`): no per-chunk temporaries.
- Elementwise work on bf16 and fp32<->bf16 copies of large tensors run at memory speed, several
  passes each. Rows are turned into loss and gradient in blocks of L2_BLOCK_BYTES of fp32, so
  log_softmax, exp and the conversions back and forth touch memory once per block.
- oneDNN's bf16 matmul is reachable from torch only with a bf16 output (no fp32-output form as
  cuBLAS has), so a weight gradient summed over several chunks needs an fp32 accumulator: each
  chunk's share is rounded once to bf16 and added in fp32. With one chunk the gradient is one
  matmul rounded once, as unfused; one chunk is used whenever it needs no more memory than
  chunks plus that accumulator (at hidden 576, vocab 128256: up to 1664 rows).
"""

from __future__ import annotations

import torch
import triton

CHUNK_BYTES = 256 * 2**20  # logits of one chunk at most
# Rows below which a chunk's matmuls fall short of their throughput: AVX-512 fp32 GEMMs reach
# it from about 256 rows (128 rows ran 20% slower), AMX bf16/fp16 ones from about 512.
MIN_CHUNK_ROWS = {torch.float32: 256, torch.float64: 256}
MIN_CHUNK_ROWS_LOW_PRECISION = 512
L2_BLOCK_BYTES = 2**20  # fp32 rows processed together: they stay in a core's L2 cache
LOW_PRECISION = (torch.float16, torch.bfloat16)


def loss_and_grad_rows_(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    scale: torch.Tensor,
    loss_out: torch.Tensor,
    write_grad: bool,
    work: torch.Tensor | None = None,
) -> None:
    """Row losses into loss_out; with write_grad, logits become (softmax - onehot) * scale.

    logits: 2-D and contiguous. Rows whose label is ignore_index or outside [0, V) get loss 0
    and a zero gradient. Rows of fp16/bf16 logits are computed in fp32 in `work` (allocated
    when not given), a block at a time, and written back rounded once, as the unfused loss
    rounds its fp32 gradient.
    """
    n_rows, n_cols = logits.shape
    if logits.dtype in LOW_PRECISION and work is None:
        rows = min(max(1, L2_BLOCK_BYTES // (4 * n_cols)), n_rows)
        work = logits.new_empty((rows, n_cols), dtype=torch.float32)
    block = work.shape[0] if work is not None else max(1, L2_BLOCK_BYTES // (4 * n_cols))
    valid = (target != ignore_index) & (target >= 0) & (target < n_cols)
    safe_target = target.masked_fill(~valid, 0)[:, None]
    # log(scale), -inf in ignored rows: exp then zeroes those rows without a pass of their own
    log_scale = torch.log(scale * valid)[:, None]
    log_p_target = torch.empty((n_rows, 1), dtype=torch.float32, device=logits.device)
    # few ops per block: their dispatch, times thousands of blocks, is not free
    for start in range(0, n_rows, block):
        end = min(start + block, n_rows)
        rows = logits[start:end]
        x = rows if work is None else work[: end - start].copy_(rows)
        torch.ops.aten._log_softmax.out(x, -1, False, out=x)
        torch.gather(x, 1, safe_target[start:end], out=log_p_target[start:end])
        if write_grad:
            x.add_(log_scale[start:end]).exp_()
            if x is not rows:
                rows.copy_(x)
    torch.neg(log_p_target.squeeze(1), out=loss_out).masked_fill_(~valid, 0.0)
    if write_grad:  # the target's entry, (p - 1) * scale, from its fp32 log-probability
        target_grad = ((log_p_target.exp() - 1) * log_scale.exp()).squeeze(1)
        # through a flat index: scatter_ into bf16 rows costs a pass over all of them on CPU
        flat = torch.arange(n_rows, device=logits.device) * logits.stride(0) + safe_target[:, 0]
        logits.view(-1).index_put_((flat,), target_grad.to(logits.dtype))


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, accumulator_bytes: int = 0) -> int:
    """Rows per chunk on a CPU.

    At most half the rows, so that the logits buffer stays below the unfused logits (which Cut
    Cross-Entropy's torch_compile path also holds), and at most CHUNK_BYTES of logits; at least
    the rows the dtype's matmuls need (MIN_CHUNK_ROWS), and at most n_rows; a power of two.
    Every row goes into one chunk instead when several would need an fp32 accumulator of
    `accumulator_bytes` (an fp16/bf16 weight gradient) and one chunk takes no more memory than
    they do with it: one chunk is then also faster, and rounds the weight gradient once.
    """
    row_bytes = vocab * dtype.itemsize
    rows = min(CHUNK_BYTES // row_bytes, n_rows // 2)
    rows = max(MIN_CHUNK_ROWS.get(dtype, MIN_CHUNK_ROWS_LOW_PRECISION), rows)
    rows = min(triton.next_power_of_2(rows + 1) // 2, n_rows)  # a power of two, rounded down
    if accumulator_bytes and n_rows * row_bytes <= rows * row_bytes + accumulator_bytes:
        return max(1, n_rows)
    return max(1, rows)


def accumulate_(accumulator: torch.Tensor, share: torch.Tensor) -> None:
    """accumulator (fp32) += share (fp16/bf16), a block of L2_BLOCK_BYTES of rows at a time.

    A mixed-dtype add_ first converts all of `share` into a new fp32 tensor the size of the
    accumulator (75 MB at vocab 32768, hidden 576: 6% of the peak of a bf16 step there);
    staged through one small fp32 block it allocates almost nothing and runs 3x faster.
    """
    n_rows, n_cols = share.shape
    rows = min(max(1, L2_BLOCK_BYTES // (4 * n_cols)), n_rows)
    block = accumulator.new_empty((rows, n_cols))
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        accumulator[start:end].add_(block[: end - start].copy_(share[start:end]))


def _scratch(shape: tuple[int, int], spare: torch.Tensor | None) -> torch.Tensor:
    """An fp32 buffer of `shape`, in the memory of `spare` (an fp16/bf16 weight gradient) when
    that is large enough. The weight gradient is written only after a chunk's rows are done, so
    the row blocks can borrow it: the peak is then the logits and the gradients alone."""
    numel = shape[0] * shape[1]
    if (
        spare is not None
        and spare.is_contiguous()
        and spare.element_size() == 2
        and spare.numel() >= 2 * numel
    ):
        return spare.view(-1)[: 2 * numel].view(torch.float32).view(shape)
    return torch.empty(shape, dtype=torch.float32)


def loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    divisor: torch.Tensor,
    need_grads: tuple[bool, bool, bool],
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss (sum of row losses / divisor) and its gradients (hidden, weight, bias) on a CPU.

    Per chunk of rows: logits into one reused buffer, the loss and the scaled gradient in place
    (loss_and_grad_rows_), then one matmul into the hidden-state gradient and one into the
    weight gradient. fp32 weight gradients are their own accumulator (addmm_); fp16/bf16 ones
    use an fp32 accumulator only when there is more than one chunk.
    """
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    need_gh, need_gw, need_gb = need_grads
    write_grad = need_gh or need_gw or need_gb
    low_precision = hidden.dtype in LOW_PRECISION
    accumulator_bytes = weight.numel() * 4 if need_gw and low_precision else 0
    chunk = chunk_size or chunk_rows(n_rows, vocab, hidden.dtype, accumulator_bytes)
    chunk = max(1, min(chunk, n_rows))
    logits_buffer = hidden.new_empty((chunk, vocab))
    grad_hidden = torch.empty_like(hidden) if need_gh else None
    grad_weight = None
    if need_gw:  # written by the first chunk's matmul; with no rows at all, it is zero
        grad_weight = torch.empty_like(weight) if n_rows else torch.zeros_like(weight)
    work = None
    if low_precision:
        block = min(max(1, L2_BLOCK_BYTES // (4 * vocab)), chunk)
        work = _scratch((block, vocab), grad_weight)
    accumulator = None
    if need_gw and low_precision and n_rows > chunk:
        accumulator = torch.empty(weight.shape, dtype=torch.float32)
    grad_bias = torch.zeros(vocab, dtype=torch.float32) if need_gb else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32)
    scale = (1.0 / divisor).reshape(1)
    weight_t = weight.t()
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        h = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        loss_and_grad_rows_(
            logits, target[start:end], ignore_index, scale, loss_rows[start:end], write_grad, work
        )
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            if start == 0 or accumulator is not None:
                torch.mm(logits.t(), h, out=grad_weight)  # a chunk's share, rounded once
            else:
                grad_weight.addmm_(logits.t(), h)
            if accumulator is not None and start == 0:
                accumulator.copy_(grad_weight)
            elif accumulator is not None:
                accumulate_(accumulator, grad_weight)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    if accumulator is not None and grad_weight is not None:
        grad_weight.copy_(accumulator)
    if grad_bias is not None and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return loss_rows.sum() / divisor, grad_hidden, grad_weight, grad_bias

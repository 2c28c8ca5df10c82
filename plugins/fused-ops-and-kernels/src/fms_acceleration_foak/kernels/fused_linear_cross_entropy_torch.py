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

from . import _host_memory as host_memory

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
    """An fp32 buffer of `shape`, in the memory of `spare` (an fp16/bf16 weight gradient, from
    the second chunk on) when that is large enough. The weight gradient is written only after a
    chunk's rows are done, so the row blocks can borrow it: no memory beyond the gradients."""
    numel = shape[0] * shape[1]
    if (
        spare is not None
        and spare.is_contiguous()
        and spare.element_size() == 2
        and spare.numel() >= 2 * numel
    ):
        return spare.view(-1)[: 2 * numel].view(torch.float32).view(shape)
    return torch.empty(shape, dtype=torch.float32)


def scatter_rows(grad_rows: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The gradient of all n_rows hidden states from that of the `rows` taken: zeros elsewhere."""
    full = grad_rows.new_zeros((n_rows, grad_rows.shape[1]))
    return full.index_copy_(0, rows, grad_rows)


def loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    divisor: torch.Tensor,
    need_grads: tuple[bool, bool, bool],
    chunk_size: int | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Loss (sum of row losses / divisor) and its gradients (hidden, weight, bias) on a CPU.

    Only the hidden states at `rows` (an index; all when None) are scored, and the gradient
    returned is theirs (scatter_rows makes the whole one). Per chunk of rows:
    logits into one reused buffer, the loss and the scaled gradient in place
    (loss_and_grad_rows_), then one matmul into the weight gradient and one into the
    hidden-state gradient. fp32 weight gradients are their own accumulator (addmm_); fp16/bf16
    ones use an fp32 accumulator only when there is more than one chunk.
    """
    if rows is not None:  # a copy of our own: the hidden-state gradient reuses its memory
        hidden, target = hidden.index_select(0, rows), target.index_select(0, rows)
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    need_gh, need_gw, need_gb = need_grads
    write_grad = need_gh or need_gw or need_gb
    low_precision = hidden.dtype in LOW_PRECISION
    accumulator_bytes = weight.numel() * 4 if need_gw and low_precision else 0
    chunk = chunk_size or chunk_rows(n_rows, vocab, hidden.dtype, accumulator_bytes)
    chunk = max(1, min(chunk, n_rows))
    # fresh each call and touched first here: in huge pages (_host_memory)
    logits_buffer = host_memory.empty((chunk, vocab), hidden.dtype)
    # A chunk's gathered rows are dead once its weight gradient is made: their gradient is
    # written over them. Otherwise the hidden-state gradient has a buffer of its own, made
    # first in each chunk, and the weight gradient (with its fp32 accumulator) is allocated
    # only at the first chunk's last matmul, after the other's oneDNN scratchpad is freed.
    # Either way, with one chunk the peak is the logits, the gradients and one scratchpad, as
    # in an unfused backward that frees its inputs early.
    in_place = rows is not None
    grad_hidden = None
    if need_gh:
        grad_hidden = hidden if in_place else host_memory.empty_like(hidden)
    grad_weight = torch.zeros_like(weight) if need_gw and not n_rows else None
    accumulator = None
    block = min(max(1, L2_BLOCK_BYTES // (4 * vocab)), chunk)
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
        work = _scratch((block, vocab), grad_weight) if low_precision else None
        loss_and_grad_rows_(
            logits, target[start:end], ignore_index, scale, loss_rows[start:end], write_grad, work
        )
        del work  # before the weight gradient exists, a block of its own
        if grad_hidden is not None and not in_place:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if need_gw:
            if grad_weight is None:
                grad_weight = host_memory.empty_like(weight)
            if low_precision and n_rows > chunk and accumulator is None:
                accumulator = host_memory.empty(tuple(weight.shape), torch.float32)
            if start == 0 or accumulator is not None:
                torch.mm(logits.t(), h, out=grad_weight)  # a chunk's share, rounded once
            else:
                grad_weight.addmm_(logits.t(), h)
            if accumulator is not None and start == 0:
                accumulator.copy_(grad_weight)
            elif accumulator is not None:
                accumulate_(accumulator, grad_weight)
        if grad_hidden is not None and in_place:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    if accumulator is not None and grad_weight is not None:
        grad_weight.copy_(accumulator)
    if grad_bias is not None and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return loss_rows.sum() / divisor, grad_hidden, grad_weight, grad_bias

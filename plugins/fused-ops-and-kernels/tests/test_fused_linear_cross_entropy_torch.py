"""The PyTorch path of fused linear CE (what runs on CPU tensors) against the unfused loss.

Unlike the Triton interpreter, this path does real fp16/bf16 arithmetic on CPU, so low precision
is checked here against the unfused loss in the same dtype: lm_head in that dtype, the loss in
fp32 (transformers' ForCausalLMLoss), its gradient rounded back. The fused path may be no less
accurate than that, measured against an fp32 reference on the same rounded inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fms_acceleration_foak import kernels as K
from fms_acceleration_foak.kernels import fused_linear_cross_entropy_torch as torch_path

LOW_PRECISION = [torch.float16, torch.bfloat16]
# (tokens, hidden, vocab, chunk): one chunk; one chunk whose fp32 row blocks borrow the weight
# gradient's memory; several chunks of an odd size; many tiny chunks
CASES = {
    "one_chunk": (256, 64, 1000, None),
    "wide_vocab": (200, 128, 5000, None),
    "chunks": (123, 48, 517, 32),
    "many_chunks": (512, 32, 96, 8),
}


@pytest.fixture(autouse=True)
def _torch_path():
    with K.backend("torch"):
        yield


def _problem(tokens, hidden, vocab, ignored=0.2):
    h = torch.randn(tokens, hidden)
    w = torch.randn(vocab, hidden) * hidden**-0.5 * 3
    b = torch.randn(vocab) * 0.1
    target = torch.randint(0, vocab, (tokens,))
    target[torch.rand(tokens) < ignored] = -100
    return h, w, b, target


def _grads(loss_fn, tensors, dtype, grad_output=2.0):
    leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
    loss = loss_fn(*leaves)
    (loss * grad_output).backward()
    return loss.detach().float(), [t.grad for t in leaves]


def _ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest error in units of dtype's epsilon times the largest reference entry."""
    scale = torch.finfo(dtype).eps * want.abs().max()
    return ((got.float() - want).abs().max() / scale).item()


def _unfused(target, num_items):
    def loss(h, w, b):
        logits = F.linear(h, w, b).float()  # lm_head in the dtype, the loss in fp32
        total = F.cross_entropy(logits, target, reduction="sum" if num_items else "mean")
        return total / num_items if num_items else total

    return loss


def _fused(target, num_items, chunk):
    def loss(h, w, b):
        return K.fused_linear_cross_entropy(h, w, target, b, -100, num_items, chunk_size=chunk)

    return loss


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("num_items", [None, 77], ids=["mean", "num_items_in_batch"])
def test_fp32_matches_the_unfused_loss(seed, case, num_items):
    tokens, hidden, vocab, chunk = case
    h, w, b, target = _problem(tokens, hidden, vocab)
    loss, grads = _grads(_fused(target, num_items, chunk), (h, w, b), torch.float32)
    ref_loss, ref_grads = _grads(_unfused(target, num_items), (h, w, b), torch.float32)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_low_precision_is_as_accurate_as_the_unfused_loss(seed, dtype, case):
    tokens, hidden, vocab, chunk = case
    h, w, b, target = _problem(tokens, hidden, vocab)
    # both see the same rounded inputs; the reference computes on them in fp32
    h, w, b = (t.to(dtype) for t in (h, w, b))
    loss, grads = _grads(_fused(target, None, chunk), (h, w, b), dtype)
    unfused_loss, unfused_grads = _grads(_unfused(target, None), (h, w, b), dtype)
    ref_loss, ref_grads = _grads(_unfused(target, None), (h, w, b), torch.float32)
    # the logits are rounded to the dtype in both, and the loss summed in fp32 from them
    assert abs(loss - unfused_loss) <= 1e-5 * abs(ref_loss)
    for name, got, unfused, ref in zip("hwb", grads, unfused_grads, ref_grads):
        assert got.dtype == dtype
        ours, theirs = _ulps(got, ref, dtype), _ulps(unfused, ref, dtype)
        # rounded once, like the unfused gradient; a weight gradient summed over several
        # chunks adds at most one rounding per chunk's share (summed in fp32)
        slack = 0.05 if chunk is None or name == "h" else 0.5
        assert ours <= theirs + slack, (name, ours, theirs)
        assert ours < 1.2, (name, ours)  # a bf16/fp16 running sum would be far off


def test_rows_that_do_not_count(seed):
    h, w, b, target = _problem(64, 16, 50, ignored=0.5)
    target[3] = -100
    # the scored rows' gradient is written over a gathered copy of them, never the caller's
    inputs = [t.clone().requires_grad_(True) for t in (h, w, b)]
    K.fused_linear_cross_entropy(*inputs[:2], target, inputs[2], chunk_size=16).backward()
    for before, after in zip((h, w, b), inputs):
        assert torch.equal(after.detach(), before)
    loss, grads = _grads(_fused(target, None, 16), (h, w, b), torch.float32)
    ref_loss, ref_grads = _grads(_unfused(target, None), (h, w, b), torch.float32)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.all(grads[0][target == -100] == 0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # no row counts: the loss is 0 / 0 (nan, as torch's mean) or 0 / num_items, no gradient
    target[:] = -100
    loss, grads = _grads(_fused(target, None, 16), (h, w, b), torch.float32)
    assert torch.isnan(loss) and torch.isnan(_unfused(target, None)(h, w, b))
    loss, grads = _grads(_fused(target, 10, 16), (h, w, b), torch.float32)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads)
    for dtype in (torch.float32, torch.bfloat16):  # no rows at all
        empty = (h[:0], w, b)
        loss, grads = _grads(_fused(target[:0], 10, None), empty, dtype)
        assert loss.item() == 0.0 and grads[0].shape == (0, 16)
        assert all(torch.all(g == 0) for g in grads[1:])


def test_the_cuda_loop_with_the_pytorch_row_step(seed):
    # backend("torch") on a GPU runs the CUDA chunk loop with this module's row step; called
    # directly here on CPU tensors
    from fms_acceleration_foak.kernels.fused_linear_cross_entropy import chunked_loss_and_grads

    h, w, b, target = _problem(90, 24, 300)
    divisor = (target != -100).sum().float()
    loss, gh, gw, gb = chunked_loss_and_grads(
        h, w, target, b, -100, divisor, (True, True, True), chunk_size=32, triton_ce=False
    )
    ref_loss, ref_grads = _grads(_unfused(target, None), (h, w, b), torch.float32, 1.0)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip((gh, gw, gb), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_frozen_weight_and_no_bias(seed):
    h, w, _, target = _problem(100, 24, 300)
    hk = h.clone().requires_grad_(True)
    K.fused_linear_cross_entropy(hk, w, target, chunk_size=32).backward()
    hr = h.clone().requires_grad_(True)
    F.cross_entropy(F.linear(hr, w), target).backward()
    assert w.grad is None
    torch.testing.assert_close(hk.grad, hr.grad, atol=1e-7, rtol=1e-5)


def test_loss_and_grad_rows_in_place(seed):
    # the row step alone: loss rows, (softmax - onehot) * scale in place, rows whose label
    # does not count zeroed; bf16 rows are computed in fp32 and rounded once
    target = torch.tensor([0, 299, -100, 5, 1000, -3, 42])
    valid = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    safe = target.masked_fill(~valid, 0)[:, None]
    scale = torch.tensor([0.25])
    logits = torch.randn(7, 300) * 4
    for dtype in (torch.float32, torch.bfloat16):
        rows, loss = logits.to(dtype, copy=True), torch.empty(7)
        torch_path.loss_and_grad_rows_(rows, target, -100, scale, loss, write_grad=True)
        log_p = torch.log_softmax(logits.to(dtype).float(), -1)  # of the rounded logits
        want_loss = torch.where(valid, -log_p.gather(1, safe).squeeze(1), 0)
        want_grad = (log_p.exp() - F.one_hot(safe[:, 0], 300)) * scale * valid[:, None]
        torch.testing.assert_close(loss, want_loss, atol=2e-6, rtol=1e-6)
        assert torch.all(rows[~valid] == 0)
        if dtype == torch.float32:
            torch.testing.assert_close(rows, want_grad, atol=1e-7, rtol=1e-6)
        else:  # each entry within half a bf16 ulp (2**-8 relative) of the fp32 gradient
            error = (rows.float() - want_grad).abs()
            assert torch.all(error <= want_grad.abs() * (2**-8 + 1e-6)), error.max()


def test_chunk_rows():
    fp32, bf16 = torch.float32, torch.bfloat16
    # at most half the rows and 256 MiB of logits; at least 256 (fp32) or 512 (bf16) rows
    assert torch_path.chunk_rows(16384, 128256, bf16) == 1024
    assert torch_path.chunk_rows(16384, 49152, fp32) == 1024
    assert torch_path.chunk_rows(16384, 32768, bf16) == 4096
    assert torch_path.chunk_rows(16384, 256000, fp32) == 256
    assert torch_path.chunk_rows(16384, 1_000_000, fp32) == 256
    assert torch_path.chunk_rows(2048, 49152, fp32) == 1024
    assert torch_path.chunk_rows(512, 32768, fp32) == 256
    assert torch_path.chunk_rows(300, 32768, fp32) == 256
    assert torch_path.chunk_rows(256, 32768, fp32) == 256
    assert torch_path.chunk_rows(100, 32768, fp32) == 100
    assert torch_path.chunk_rows(1024, 128256, bf16) == 512
    assert torch_path.chunk_rows(300, 128256, bf16) == 300
    # a bf16 weight gradient at hidden 576: one chunk unless chunks plus the fp32 accumulator
    # they need (282 MiB at vocab 128256) take less memory
    accumulator = 128256 * 576 * 4
    assert torch_path.chunk_rows(1024, 128256, bf16, accumulator) == 1024
    assert torch_path.chunk_rows(1664, 128256, bf16, accumulator) == 1664
    assert torch_path.chunk_rows(1665, 128256, bf16, accumulator) == 512
    assert torch_path.chunk_rows(8192, 128256, bf16, accumulator) == 1024


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("rows,cols", [(3, 5), (1037, 577), (4099, 64)])
def test_accumulate_adds_a_low_precision_share_into_fp32_exactly(seed, dtype, rows, cols):
    # more rows than one L2 block holds, a remainder block, and fewer rows than a block
    accumulator = torch.randn(rows, cols)
    share = torch.randn(rows, cols).to(dtype)
    expected = accumulator + share.float()
    torch_path.accumulate_(accumulator, share)
    assert accumulator.dtype == torch.float32
    torch.testing.assert_close(accumulator, expected, atol=0, rtol=0)

"""Every kernel, forward and backward, against its plain-PyTorch reference.

On CPU the kernels run in the Triton interpreter; with CUDA (scripts/gpu/suite.sh) the same
tests run the compiled kernels on the GPU, in bf16 too and at larger, realistic shapes.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest
import torch

from fms_acceleration_foak import kernels as K

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
# bf16 arithmetic is wrong under the interpreter: bf16 is checked on CUDA (and where a test
# only loads bf16 and computes in fp32, as the kernels do).
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if ON_CUDA else [])]
# (atol, rtol) per dtype against an fp32 reference (as conftest's assert_close), and relative
# tolerances of gradients to their largest entry
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
TOL_REL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _triton_only():
    # Force the Triton path (interpreter on CPU, compiled on CUDA): no silent fallback can pass.
    with K.backend("triton"):
        yield


def _ids(dtypes):
    return [str(d).removeprefix("torch.") for d in dtypes]


# --- RMSNorm ------------------------------------------------------------------------------------

RMS_SHAPES = {
    "real": (2, 64, 256),
    "odd": (37, 123),
    "head_dim_rows": (3, 67, 4, 128),  # Qwen3 q_norm/k_norm: many 128-wide rows, tiles of 16
    "wide_chunked": (3, 9000),  # wider than MAX_FUSED_BLOCK: column chunks
    **({"hidden_4096": (4, 512, 4096), "hidden_16384": (2, 256, 16384)} if ON_CUDA else {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", list(RMS_SHAPES.values()), ids=list(RMS_SHAPES))
def test_rms_norm(seed, assert_close, leaf, device, dtype, shape):
    x = torch.randn(*shape, device=device) * 2
    w = torch.rand(shape[-1], device=device) + 0.5
    dy = torch.randn(*shape, device=device)
    xk, wk = leaf(x, dtype), leaf(w, dtype)
    y = K.rms_norm(xk, wk, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy.to(dtype))
    xr, wr = leaf(x), leaf(w)
    yr = K.rms_norm_reference(xr, wr, 1e-6)
    yr.backward(dy)
    assert_close(y, yr, dtype)
    assert_close(xk.grad, xr.grad, dtype)
    # dW sums one rounded term per row: its absolute error grows like sqrt(rows)
    rows = x.numel() // shape[-1]
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(wk.grad.float(), wr.grad, atol=atol * rows**0.5, rtol=2 * rtol)


def test_rms_norm_launch_shapes_follow_row_width():
    # Fix 3/4: several narrow rows per program; warps so the backward holds ~8 values per
    # thread per tensor; rows wider than 8192 in chunks.
    from fms_acceleration_foak.kernels.rms_norm import RMSNormLaunch, launch_config

    assert launch_config(128) == RMSNormLaunch(128, 16, 4, 8, False)  # head_dim rows
    assert launch_config(64) == RMSNormLaunch(64, 32, 4, 8, False)
    assert launch_config(576) == RMSNormLaunch(1024, 2, 4, 8, False)  # SmolLM2 hidden
    assert launch_config(4096) == RMSNormLaunch(4096, 1, 8, 16, False)  # Llama-3-8B hidden
    assert launch_config(8192) == RMSNormLaunch(8192, 1, 16, 32, False)
    assert launch_config(16384) == RMSNormLaunch(4096, 1, 8, 16, True)


def test_rms_norm_backward_programs_fill_the_device():
    from fms_acceleration_foak.kernels.rms_norm import backward_programs

    cpu = torch.device("cpu")  # the interpreter counts 8 "multiprocessors"
    assert backward_programs(n_tiles=3, bwd_warps=8, device=cpu) == 3
    assert backward_programs(n_tiles=10_000, bwd_warps=8, device=cpu) == 4 * 8
    assert backward_programs(n_tiles=10_000, bwd_warps=32, device=cpu) == 8


# --- RoPE ---------------------------------------------------------------------------------------


def _rotary(batch: int, seq: int, dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = torch.arange(seq, device=device).float() + torch.rand(1, device=device) * 10
    emb = torch.cat([torch.outer(positions, inv_freq)] * 2, -1)
    return emb.cos()[None].expand(batch, seq, dim), emb.sin()[None].expand(batch, seq, dim)


ROPE_CASES = {
    "real": (2, 8, 2, 32, 64, 1),
    "odd": (1, 3, 3, 17, 22, 2),
    **({"llama3_8b": (2, 32, 8, 1024, 128, 1)} if ON_CUDA else {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq, dim, unsqueeze_dim", ROPE_CASES.values(), ids=list(ROPE_CASES)
)
def test_rope(
    seed, assert_close, leaf, device, dtype, batch, heads, kv_heads, seq, dim, unsqueeze_dim
):
    # q, k as attention layers make them: a [B, S, H, D] projection viewed as [B, H, S, D]
    q = torch.randn(batch, seq, heads, dim, device=device)
    k = torch.randn(batch, seq, kv_heads, dim, device=device)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _rotary(batch, seq, dim, device)
    qk, kk = leaf(q, dtype), leaf(k, dtype)
    qo, ko = K.rope(qk, kk, cos.to(dtype), sin.to(dtype), unsqueeze_dim)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward([qo, ko], [dq.to(dtype), dk.to(dtype)])
    qr, kr = leaf(q), leaf(k)
    qe, ke = K.rope_reference(qr, kr, cos, sin, unsqueeze_dim)
    torch.autograd.backward([qe, ke], [dq, dk])
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert qo.stride() == q.stride()  # the attention's layout is kept
    for got, want in ((qo, qe), (ko, ke), (qk.grad, qr.grad), (kk.grad, kr.grad)):
        assert_close(got, want, dtype, scale=2)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rope_under_autocast_returns_the_reference_dtypes(seed, leaf, device, low):
    # Fix 8: under autocast q/k come out of the projections in bf16 while the rotary tables
    # stay fp32 (computed from fp32 hidden states); transformers then returns fp32 q/k.
    q = torch.randn(2, 12, 4, 32, device=device).transpose(1, 2)
    k = torch.randn(2, 12, 2, 32, device=device).transpose(1, 2)
    cos, sin = _rotary(2, 12, 32, device)
    qk, kk = leaf(q, low), leaf(k, low)
    qr, kr = leaf(q, low), leaf(k, low)
    ctx = torch.autocast(device.type, dtype=low)
    with ctx:
        qo, ko = K.rope(qk, kk, cos, sin)
        qe, ke = K.rope_reference(qr, kr, cos, sin)
    assert (qo.dtype, ko.dtype) == (qe.dtype, ke.dtype) == (torch.float32, torch.float32)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [dq, dk])
    torch.autograd.backward([qe, ke], [dq, dk])
    assert qk.grad.dtype == kk.grad.dtype == low
    for got, want in ((qo, qe), (ko, ke)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in ((qk.grad, qr.grad), (kk.grad, kr.grad)):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# --- cross-entropy ------------------------------------------------------------------------------

CE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernels only load bf16
CE_CASES = {
    "real": (128, 3001),
    "odd": (37, 123),
    **({"llama3_vocab": (2048, 128256)} if ON_CUDA else {}),
}


@pytest.mark.parametrize("dtype", CE_DTYPES, ids=_ids(CE_DTYPES))
@pytest.mark.parametrize("rows, vocab", CE_CASES.values(), ids=list(CE_CASES))
@pytest.mark.parametrize("num_items", [None, 50], ids=["mean", "num_items_in_batch"])
def test_cross_entropy(seed, assert_close, leaf, device, dtype, rows, vocab, num_items):
    logits = torch.randn(rows, vocab, device=device) * 4
    target = torch.randint(0, vocab, (rows,), device=device)
    target[torch.rand(rows, device=device) < 0.2] = -100
    lk = leaf(logits, dtype)
    loss = K.cross_entropy(lk, target, -100, num_items)
    (loss * 3).backward()
    lr = leaf(logits.to(dtype).float())  # the reference sees the same rounded logits
    ref = K.cross_entropy_reference(lr, target, -100, num_items)
    (ref * 3).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert ref.item() > 1.0  # a real loss, not a degenerate zero
    torch.testing.assert_close(loss, ref, atol=1e-5 * rows, rtol=1e-5)
    assert lk.grad.dtype == dtype  # the gradient comes back in the logits' dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}[dtype]
    torch.testing.assert_close(lk.grad.float(), lr.grad, atol=tol, rtol=2e-2)
    assert torch.all(lk.grad[target == -100] == 0)


def test_cross_entropy_vocab_spans_several_blocks(seed, assert_close, leaf, device):
    # a vocabulary larger than one block exercises the online log-sum-exp across blocks
    ce_module = importlib.import_module("fms_acceleration_foak.kernels.cross_entropy")

    vocab = ce_module.MAX_VOCAB_BLOCK * 2 + 5
    logits = torch.randn(4, vocab, device=device) * 4
    target = torch.tensor([0, vocab - 1, ce_module.MAX_VOCAB_BLOCK, 7], device=device)
    lk, lr = leaf(logits), leaf(logits)
    K.cross_entropy(lk, target).backward()
    K.cross_entropy_reference(lr, target).backward()
    assert_close(lk.grad, lr.grad, torch.float32)


@pytest.mark.parametrize("bad", [123, 5000, -1, -7], ids=["vocab", "far", "minus1", "negative"])
def test_labels_outside_the_vocabulary_are_refused(seed, bad):
    # Fix 6: such labels used to be read out of bounds; torch raises on them, and so do we. On
    # CPU tensors (read for free) the error names the label; on a GPU it is a device-side
    # assert (test_label_check_reads_no_values), which would poison this process's CUDA context.
    logits = torch.randn(8, 123, requires_grad=True)
    target = torch.randint(0, 123, (8,))
    target[5] = bad
    message = rf"1 target label\(s\) outside \[0, 123\).*ignore_index=-100.*{bad} at flat position"
    with pytest.raises(ValueError, match=message):
        K.cross_entropy(logits, target)
    hidden, weight = torch.randn(8, 16), torch.randn(123, 16)
    for name in ("triton", "torch"):  # the Triton path (interpreter) and the CPU path
        with K.backend(name), pytest.raises(ValueError, match=message):
            K.fused_linear_cross_entropy(hidden, weight, target)
    with K.backend("torch"), pytest.raises((IndexError, RuntimeError, ValueError)):
        K.cross_entropy(logits, target)  # the reference path refuses them too (torch)
    target[5] = -100  # ignore_index itself is fine, and so is a custom one inside the vocab
    assert torch.isfinite(K.cross_entropy(logits, target))
    target[5] = 0
    assert torch.isfinite(K.cross_entropy(logits, target, ignore_index=0))


def test_label_check_reads_no_values(monkeypatch):
    # Off the CPU the check must not wait for the device: it is one device-side assert. Meta
    # tensors have no values, so any read (bool(), .item(), nonzero) would raise here.
    ce_module = importlib.import_module("fms_acceleration_foak.kernels.cross_entropy")
    asserted = []
    real = torch._assert_async
    monkeypatch.setattr(torch, "_assert_async", lambda t, msg: asserted.append(msg) or real(t, msg))
    target = torch.empty(16, dtype=torch.long, device="meta")
    ce_module.check_targets(target, 123, -100)
    assert asserted == [
        "cross_entropy: a target label outside [0, 123) that is not ignore_index=-100"
    ]


def test_kernel_clamps_labels_it_was_not_told_about(seed, device):
    # the host check is the error; the kernel itself never reads outside the row either
    from fms_acceleration_foak.kernels.cross_entropy import ce_loss_rows

    logits = torch.randn(4, 50, device=device)
    target = torch.tensor([3, 10_000_000, -5, 49], device=device)
    loss, lse = ce_loss_rows(logits, target, -100)
    ref_lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(lse, ref_lse)
    assert loss[1] == loss[2] == 0
    rows = torch.tensor([0, 3], device=device)
    torch.testing.assert_close(loss[rows], ref_lse[rows] - logits[rows, target[rows]])


# --- fused linear cross-entropy -----------------------------------------------------------------

FLCE_CASES = {
    "real": (256, 64, 1000, None),
    "odd": (123, 48, 123, 32),
    **({"llama3_head": (4096, 4096, 128256, None)} if ON_CUDA else {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("tokens, hidden, vocab, chunk", FLCE_CASES.values(), ids=list(FLCE_CASES))
@pytest.mark.parametrize("num_items", [None, 77], ids=["mean", "num_items_in_batch"])
def test_fused_linear_cross_entropy(
    seed, assert_close, leaf, device, dtype, tokens, hidden, vocab, chunk, num_items
):
    h = torch.randn(tokens, hidden, device=device)
    w = torch.randn(vocab, hidden, device=device) * hidden**-0.5 * 3
    b = torch.randn(vocab, device=device) * 0.1
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < 0.2] = -100
    hk, wk, bk = leaf(h, dtype), leaf(w, dtype), leaf(b, dtype)
    loss = K.fused_linear_cross_entropy(hk, wk, target, bk, -100, num_items, chunk_size=chunk)
    (loss * 2).backward()
    hr, wr, br = leaf(hk.detach().float()), leaf(wk.detach().float()), leaf(bk.detach().float())
    ref = K.fused_linear_cross_entropy_reference(hr, wr, target, br, -100, num_items)
    (ref * 2).backward()
    assert ref.item() > 1.0
    assert hk.grad.dtype == wk.grad.dtype == bk.grad.dtype == dtype
    assert_close(loss, ref, dtype, scale=2)
    for got, want in ((hk.grad, hr.grad), (wk.grad, wr.grad), (bk.grad, br.grad)):
        # gradients are small (divided by the token count): compare relative to their scale
        torch.testing.assert_close(
            got.float(), want, atol=TOL_REL[dtype] * want.abs().max().item(), rtol=TOL_REL[dtype]
        )


@pytest.mark.parametrize("ignored", [0.0, 0.7, 1.0], ids=["none", "most", "all"])
def test_fused_linear_cross_entropy_computes_only_scored_rows(
    seed, leaf, device, monkeypatch, ignored
):
    # prompt tokens (label -100) get no logits at all: the chunk loop sees only scored rows,
    # and the loss and every gradient still equal the reference's, zeros in ignored rows
    flce = importlib.import_module("fms_acceleration_foak.kernels.fused_linear_cross_entropy")
    seen = []
    inner = flce.chunked_loss_and_grads
    monkeypatch.setattr(
        flce,
        "chunked_loss_and_grads",
        lambda h, *a, **k: seen.append(h.shape[0]) or inner(h, *a, **k),
    )
    tokens, hidden, vocab = 301, 40, 517
    h = torch.randn(tokens, hidden, device=device)
    w = torch.randn(vocab, hidden, device=device) * hidden**-0.5 * 3
    b = torch.randn(vocab, device=device) * 0.1
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < ignored] = -100
    scored = int((target != -100).sum())
    hk, wk, bk = leaf(h), leaf(w), leaf(b)
    loss = K.fused_linear_cross_entropy(hk, wk, target, bk, -100, 211, chunk_size=64)
    loss.backward()
    hr, wr, br = leaf(h), leaf(w), leaf(b)
    ref = K.fused_linear_cross_entropy_reference(hr, wr, target, br, -100, 211)
    ref.backward()
    assert seen == [scored if scored else tokens]
    assert 0 < scored < tokens or ignored in (0.0, 1.0)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in ((hk.grad, hr.grad), (wk.grad, wr.grad), (bk.grad, br.grad)):
        torch.testing.assert_close(
            got, want, atol=1e-4 * want.abs().max().item() + 1e-12, rtol=1e-4
        )
    assert torch.all(hk.grad[target == -100] == 0)


def test_fused_linear_cross_entropy_accumulates_weight_grad_in_fp32(seed, device):
    # Fix 5: the weight gradient sums one contribution per chunk. Summed in fp16 it is rounded
    # once per chunk; in fp32 once at the end. 64 chunks make the difference plain.
    tokens, hidden, vocab = 512, 32, 96
    h = torch.randn(tokens, hidden, device=device).half()
    w = (torch.randn(vocab, hidden, device=device) * 0.3).half().requires_grad_(True)
    target = torch.randint(0, vocab, (tokens,), device=device)
    K.fused_linear_cross_entropy(h, w, target, chunk_size=8).backward()
    # exact reference on the same fp16 inputs; the kernel's per-row gradient is rounded to fp16
    # before its matmuls, so build the reference from those same rounded rows
    logits = (h @ w.detach().t()).float()  # the same fp16 logits the kernel sees
    grad_rows = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, vocab)) / tokens
    grad_rows = grad_rows.half().float()
    exact = grad_rows.t() @ h.float()
    # errors in fp16 ulps of the largest entry: one final rounding is at most half of one
    unit = torch.finfo(torch.float16).eps * exact.abs().max()
    err_fp32 = ((w.grad.float() - exact).abs() / unit).max().item()
    running = torch.zeros_like(w, dtype=torch.float16)  # what a fp16 running sum gives
    for s in range(0, tokens, 8):
        running += (grad_rows[s : s + 8].t() @ h[s : s + 8].float()).half()
    err_fp16 = ((running.float() - exact).abs() / unit).max().item()
    assert err_fp32 <= 0.6 and err_fp16 >= 1.2, (err_fp32, err_fp16)


def test_accumulate_matmul_keeps_fp32_on_every_path(seed):
    from fms_acceleration_foak.kernels.fused_linear_cross_entropy import accumulate_matmul

    a, b = torch.randn(40, 8).bfloat16(), torch.randn(8, 30).bfloat16()
    acc = torch.ones(40, 30)
    accumulate_matmul(acc, a, b)
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc, 1 + a.float() @ b.float())


def test_fused_linear_cross_entropy_chunks():
    from fms_acceleration_foak.kernels.fused_linear_cross_entropy import default_chunk_size

    # Llama-3-8B head, 16k tokens on a GPU: weight gradient -> ~hidden tokens per chunk (4
    # chunks); frozen lm_head -> chunks as large as the hidden states, at least 1024 rows.
    assert default_chunk_size(16384, 4096, 128256, weight_grad=True) == 4096
    assert default_chunk_size(16384, 4096, 128256, weight_grad=False) == 1024
    assert default_chunk_size(100, 4096, 128256, weight_grad=True) == 128
    assert default_chunk_size(65536, 576, 49152, weight_grad=False) == 1024
    # the CPU path keeps chunks of logits about the size of the hidden states
    assert default_chunk_size(16384, 4096, 128256, weight_grad=True, on_cuda=False) == 512
    assert default_chunk_size(4096, 2048, 128256, weight_grad=True, on_cuda=False) == 128


def test_fused_linear_cross_entropy_frozen_weight_and_torch_path(seed, assert_close, leaf, device):
    # LoRA trains with a frozen lm_head: no weight gradient is built; the CPU path agrees too
    h, w = torch.randn(64, 32, device=device), torch.randn(300, 32, device=device) * 0.3
    target = torch.randint(0, 300, (64,), device=device)
    grads = []
    for name in ("triton", "torch"):
        hk = leaf(h)
        with K.backend(name):
            K.fused_linear_cross_entropy(hk, w, target, chunk_size=16).backward()
        grads.append(hk.grad)
    hr = leaf(h)
    K.fused_linear_cross_entropy_reference(hr, w, target).backward()
    assert w.grad is None
    assert_close(grads[0], hr.grad, torch.float32)
    assert_close(grads[1], hr.grad, torch.float32)


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_fused_linear_cross_entropy_under_autocast(seed, leaf, device, name):
    # mixed precision: fp32 master weights, bf16 matmuls, as lm_head + loss under autocast
    h, w = torch.randn(48, 32, device=device), torch.randn(200, 32, device=device) * 0.3
    target = torch.randint(0, 200, (48,), device=device)
    hk, wk, hr, wr = leaf(h), leaf(w), leaf(h), leaf(w)
    with K.backend(name), torch.autocast(device.type, dtype=torch.bfloat16):
        loss = K.fused_linear_cross_entropy(hk, wk, target, chunk_size=16)
        logits = torch.nn.functional.linear(hr, wr)
    loss.backward()
    ref = K.cross_entropy_reference(logits, target)
    ref.backward()
    assert hk.grad.dtype == wk.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hk.grad, hr.grad, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(wk.grad, wr.grad, atol=2e-2, rtol=5e-2)


# --- SwiGLU -------------------------------------------------------------------------------------

SWIGLU_SHAPES = {
    "real": (4, 64, 256),
    "odd": (37, 123),
    **({"llama3_8b": (2, 2048, 14336)} if ON_CUDA else {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", list(SWIGLU_SHAPES.values()), ids=list(SWIGLU_SHAPES))
def test_swiglu(seed, assert_close, leaf, device, dtype, shape):
    gate = torch.randn(*shape, device=device) * 2
    up, dy = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    gk, uk = leaf(gate, dtype), leaf(up, dtype)
    y = K.swiglu(gk, uk)
    y.backward(dy.to(dtype))
    gr, ur = leaf(gk.detach()), leaf(uk.detach())
    yr = K.swiglu_reference(gr, ur)  # in the same dtype: silu rounded before the product
    yr.backward(dy.to(dtype))
    assert y.dtype == dtype and gk.grad.dtype == dtype
    assert_close(y, yr, dtype)
    assert_close(gk.grad, gr.grad, dtype)
    assert_close(uk.grad, ur.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_swiglu_packed_gate_up(seed, assert_close, leaf, device, dtype):
    # MoE experts: gate, up = gate_up.chunk(2, -1) read in place; one [.., 2I] gradient back
    gate_up = torch.randn(29, 2 * 96, device=device) * 2
    dy = torch.randn(29, 96, device=device)
    gk = leaf(gate_up, dtype)
    y = K.swiglu_packed(gk)
    y.backward(dy.to(dtype))
    gr = leaf(gk.detach())
    g, u = gr.chunk(2, dim=-1)
    (K.swiglu_reference(g, u)).backward(dy.to(dtype))
    assert y.shape == (29, 96) and gk.grad.shape == gate_up.shape
    assert_close(y, K.swiglu_reference(*gk.detach().chunk(2, -1)), dtype)
    assert_close(gk.grad, gr.grad, dtype)


def test_swiglu_backward_hands_back_the_forward_activation(seed, device):
    # the fused LoRA MLP needs h = silu(gate) * up again in its backward: one kernel gives h
    # (bit-identical to the forward's), dgate and dup
    from fms_acceleration_foak.kernels.swiglu import swiglu_backward, swiglu_forward

    gate, up = torch.randn(50, 70, device=device) * 2, torch.randn(50, 70, device=device)
    dout = torch.randn(50, 70, device=device)
    h, dgate, dup = swiglu_backward(dout, gate, up, want_h=True)
    assert torch.equal(h, swiglu_forward(gate, up))
    gr, ur = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    K.swiglu_reference(gr, ur).backward(dout)
    torch.testing.assert_close(dgate, gr.grad)
    torch.testing.assert_close(dup, ur.grad)


def test_fused_lora_mlp_backward_uses_one_swiglu_kernel(seed, monkeypatch, device):
    # Fix 2: the fused LoRA MLP runs the SwiGLU kernels (forward and one backward pass)
    from fms_acceleration_foak.kernels import fused_lora
    from fms_acceleration_foak.kernels.fused_lora import LoRAProjection, fused_lora_swiglu_mlp
    from fms_acceleration_foak.kernels.fused_lora_bases import frozen_base

    calls = []
    real = fused_lora.swiglu_backward
    monkeypatch.setattr(
        fused_lora, "swiglu_backward", lambda *a, **k: calls.append(k) or real(*a, **k)
    )

    def proj(n_in, n_out):
        base = torch.nn.Linear(n_in, n_out, bias=False, device=device).requires_grad_(False)
        a = torch.randn(4, n_in, device=device) * 0.1
        b = torch.randn(n_out, 4, device=device) * 0.1
        return LoRAProjection(frozen_base(base), a.requires_grad_(), b.requires_grad_(), 2.0)

    gate, up, down = proj(16, 40), proj(16, 40), proj(40, 16)
    x = torch.randn(3, 5, 16, device=device, requires_grad=True)
    out = fused_lora_swiglu_mlp(x, gate, up, down)
    out.sum().backward()

    def plain(p, t):
        return t @ p.base.weight(torch.float32).t() + 2.0 * (t @ p.lora_A.t()) @ p.lora_B.t()

    ref = plain(down, torch.nn.functional.silu(plain(gate, x)) * plain(up, x))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert calls == [{"want_h": True}]
    assert down.lora_A.grad is not None and gate.lora_B.grad is not None


# --- dispatch and device guard ------------------------------------------------------------------


def test_dispatch_takes_torch_path_off_cuda_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 8)
    with K.backend("auto"):
        assert not K.use_triton(x)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), K.backend("triton"):
            K.use_triton(x)
    with pytest.raises(ValueError, match="backend must be one of"), K.backend("cuda"):
        pass


def test_device_guard_makes_the_tensor_device_current():
    # Fix 7: a launch for a tensor on cuda:1 must run with cuda:1 current (Triton launches on
    # the current device's stream). Constructing the guard touches no GPU.
    guard = K.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(K.device_guard(torch.device("cpu")), torch.cuda.device)


def test_every_kernel_launch_goes_through_the_device_guard():
    # No `kernel[grid](...)` outside _dispatch.launch: every launch is under device_guard.
    kernels_dir = Path(K.__file__).parent
    direct = []
    for path in sorted(kernels_dir.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                    direct.append(f"{path.name}:{fn.name}")
    assert direct == ["_dispatch.py:launch"], direct


def test_launches_are_guarded_with_the_input_device(seed, monkeypatch, device):
    from fms_acceleration_foak.kernels import _dispatch

    entered = []
    real = _dispatch.device_guard
    monkeypatch.setattr(_dispatch, "device_guard", lambda d: entered.append(d) or real(d))
    x = torch.randn(6, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    K.rms_norm(x, w).sum().backward()
    q = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    cos, sin = _rotary(1, 5, 8, device)
    sum(t.sum() for t in K.rope(q, q.detach().clone().requires_grad_(), cos, sin)).backward()
    K.swiglu(x, x.detach()).sum().backward()
    K.swiglu_packed(x).sum().backward()
    target = torch.randint(0, 40, (6,), device=device)
    K.cross_entropy(x, target).backward()
    K.fused_linear_cross_entropy(x, torch.randn(30, 40, device=device), target % 30).backward()
    # rms fwd+bwd, rope fwd+bwd, swiglu 2x fwd+bwd, ce fwd+bwd, fused linear CE (one chunk)
    assert len(entered) == 2 + 2 + 4 + 2 + 1
    assert all(d == x.device for d in entered)

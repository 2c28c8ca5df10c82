"""Every kernel, forward and backward, against its plain-PyTorch reference (Triton interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch

from fms_acceleration_foak import kernels as K

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _triton_only():
    # The interpreter is on (conftest); force the Triton path so a silent fallback cannot pass.
    with K.backend("triton"):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 64, 256), (37, 123)], ids=["real", "odd"])
def test_rms_norm(seed, assert_close, leaf, dtype, shape):
    x = torch.randn(*shape) * 2
    w = torch.rand(shape[-1]) + 0.5
    dy = torch.randn(*shape)
    xk, wk = leaf(x, dtype), leaf(w, dtype)
    y = K.rms_norm(xk, wk, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy.to(dtype))
    xr, wr = leaf(x), leaf(w)
    yr = K.rms_norm_reference(xr, wr, 1e-6)
    yr.backward(dy)
    assert_close(y, yr, dtype)
    assert_close(xk.grad, xr.grad, dtype)
    assert_close(wk.grad, wr.grad, dtype, scale=shape[0] if dtype != torch.float32 else 10)


def _rotary(batch: int, seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float() + torch.rand(1) * 10, inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos()[None].expand(batch, seq, dim), emb.sin()[None].expand(batch, seq, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, seq, dim, unsqueeze_dim",
    [(2, 8, 2, 32, 64, 1), (1, 3, 3, 17, 22, 2)],
    ids=["real", "odd"],
)
def test_rope(seed, assert_close, leaf, dtype, batch, heads, kv_heads, seq, dim, unsqueeze_dim):
    # q, k as attention layers make them: a [B, S, H, D] projection viewed as [B, H, S, D]
    q = torch.randn(batch, seq, heads, dim)
    k = torch.randn(batch, seq, kv_heads, dim)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _rotary(batch, seq, dim)
    qk, kk = leaf(q, dtype), leaf(k, dtype)
    qo, ko = K.rope(qk, kk, cos.to(dtype), sin.to(dtype), unsqueeze_dim)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    torch.autograd.backward([qo, ko], [dq.to(dtype), dk.to(dtype)])
    qr, kr = leaf(q), leaf(k)
    qe, ke = K.rope_reference(qr, kr, cos, sin, unsqueeze_dim)
    torch.autograd.backward([qe, ke], [dq, dk])
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    for got, want in ((qo, qe), (ko, ke), (qk.grad, qr.grad), (kk.grad, kr.grad)):
        assert_close(got, want, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(128, 3001), (37, 123)], ids=["real", "odd"])
@pytest.mark.parametrize("num_items", [None, 50], ids=["mean", "num_items_in_batch"])
def test_cross_entropy(seed, assert_close, leaf, dtype, rows, vocab, num_items):
    logits = torch.randn(rows, vocab) * 4
    target = torch.randint(0, vocab, (rows,))
    target[torch.rand(rows) < 0.2] = -100
    lk = leaf(logits, dtype)
    loss = K.cross_entropy(lk, target, -100, num_items)
    (loss * 3).backward()
    lr = leaf(logits)
    ref = K.cross_entropy_reference(lr, target, -100, num_items)
    (ref * 3).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert ref.item() > 1.0  # a real loss, not a degenerate zero
    assert_close(loss, ref, dtype)
    assert lk.grad.dtype == dtype
    assert_close(lk.grad, lr.grad, dtype)
    assert torch.all(lk.grad[target == -100] == 0)


def test_cross_entropy_vocab_spans_several_blocks(seed, assert_close, leaf):
    # a vocabulary larger than one block exercises the online log-sum-exp across blocks
    ce_module = importlib.import_module("fms_acceleration_foak.kernels.cross_entropy")

    vocab = ce_module.MAX_VOCAB_BLOCK * 2 + 5
    logits = torch.randn(4, vocab) * 4
    target = torch.tensor([0, vocab - 1, ce_module.MAX_VOCAB_BLOCK, 7])
    lk, lr = leaf(logits), leaf(logits)
    K.cross_entropy(lk, target).backward()
    K.cross_entropy_reference(lr, target).backward()
    assert_close(lk.grad, lr.grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens, hidden, vocab, chunk", [(256, 64, 1000, None), (123, 48, 123, 32)], ids=["real", "odd"]
)
@pytest.mark.parametrize("num_items", [None, 77], ids=["mean", "num_items_in_batch"])
def test_fused_linear_cross_entropy(
    seed, assert_close, leaf, dtype, tokens, hidden, vocab, chunk, num_items
):
    h = torch.randn(tokens, hidden)
    w = torch.randn(vocab, hidden) * 0.3
    b = torch.randn(vocab) * 0.1
    target = torch.randint(0, vocab, (tokens,))
    target[torch.rand(tokens) < 0.2] = -100
    hk, wk, bk = leaf(h, dtype), leaf(w, dtype), leaf(b, dtype)
    loss = K.fused_linear_cross_entropy(hk, wk, target, bk, -100, num_items, chunk_size=chunk)
    (loss * 2).backward()
    hr, wr, br = leaf(h), leaf(w), leaf(b)
    ref = K.fused_linear_cross_entropy_reference(hr, wr, target, br, -100, num_items)
    (ref * 2).backward()
    assert ref.item() > 1.0
    assert_close(loss, ref, dtype, scale=2)
    assert_close(hk.grad, hr.grad, dtype, scale=2)
    assert_close(wk.grad, wr.grad, dtype, scale=4)
    assert_close(bk.grad, br.grad, dtype, scale=4)


def test_fused_linear_cross_entropy_frozen_weight_and_torch_path(seed, assert_close, leaf):
    # LoRA trains with a frozen lm_head: no weight gradient is built; the CPU path agrees too
    h, w = torch.randn(64, 32), torch.randn(300, 32) * 0.3
    target = torch.randint(0, 300, (64,))
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 64, 256), (37, 123)], ids=["real", "odd"])
def test_swiglu(seed, assert_close, leaf, dtype, shape):
    gate, up, dy = torch.randn(*shape) * 2, torch.randn(*shape), torch.randn(*shape)
    gk, uk = leaf(gate, dtype), leaf(up, dtype)
    y = K.swiglu(gk, uk)
    y.backward(dy.to(dtype))
    gr, ur = leaf(gate), leaf(up)
    yr = K.swiglu_reference(gr, ur)
    yr.backward(dy)
    assert y.dtype == dtype
    assert_close(y, yr, dtype)
    assert_close(gk.grad, gr.grad, dtype)
    assert_close(uk.grad, ur.grad, dtype)


def test_dispatch_takes_torch_path_off_cuda_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 8)
    with K.backend("auto"):
        assert not K.use_triton(x)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), K.backend("triton"):
            K.use_triton(x)
    with pytest.raises(ValueError, match="backend must be one of"), K.backend("cuda"):
        pass


@pytest.mark.parametrize("name", ["triton", "torch"])
def test_fused_linear_cross_entropy_under_autocast(seed, leaf, name):
    # mixed precision: fp32 master weights, bf16 matmuls, as lm_head + loss under autocast
    h, w = torch.randn(48, 32), torch.randn(200, 32) * 0.3
    target = torch.randint(0, 200, (48,))
    hk, wk, hr, wr = leaf(h), leaf(w), leaf(h), leaf(w)
    with K.backend(name), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = K.fused_linear_cross_entropy(hk, wk, target, chunk_size=16)
        logits = torch.nn.functional.linear(hr, wr)
    loss.backward()
    ref = K.cross_entropy_reference(logits, target)
    ref.backward()
    assert hk.grad.dtype == wk.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hk.grad, hr.grad, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(wk.grad, wr.grad, atol=2e-2, rtol=5e-2)

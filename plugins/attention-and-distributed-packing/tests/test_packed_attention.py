"""Per-example sdpa over a packed row against a plain-PyTorch reference on random inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fms_acceleration_aadp.packed_attention import build_packed_attention


class _Module(torch.nn.Module):
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def reference_attention(q, k, v, bounds, scale):
    """Causal softmax attention within each example, written out (q: [1, H, T, D])."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    for start, end in itertools.pairwise(bounds):
        scores = q[:, :, start:end] @ k[:, :, start:end].transpose(-1, -2) * scale
        n = end - start
        scores = scores.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        out[:, :, start:end] = scores.softmax(-1) @ v[:, :, start:end]
    return out.transpose(1, 2)  # [1, T, H, D] as attention functions return it


@pytest.mark.parametrize(("heads", "kv_heads", "bounds"), [(4, 2, [0, 5, 6, 19]), (2, 2, [0, 7])])
def test_each_example_attends_only_to_itself(heads, kv_heads, bounds):
    torch.manual_seed(0)
    total, dim = bounds[-1], 16
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    cu = torch.tensor(bounds, dtype=torch.int32)
    attention = build_packed_attention(sdpa_attention_forward)
    out, weights = attention(
        _Module(heads // kv_heads), q, k, v, None, scaling=1 / math.sqrt(dim),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=19, max_length_k=19,
    )  # fmt: skip
    expected = reference_attention(q, k, v, bounds, 1 / math.sqrt(dim))
    assert weights is None and out.shape == (1, total, heads, dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        {},  # no boundaries: a padded batch
        {"sliding_window": 4},  # windows need the mask transformers builds
        {"cu_seq_lens_k": torch.tensor([0, 3, 7], dtype=torch.int32)},  # q and k differ
    ],
)
def test_other_calls_reach_the_original_function_unchanged(extra):
    seen = []

    def original(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((query.shape, attention_mask, set(kwargs)))
        return query.transpose(1, 2), None

    q = torch.randn(1, 2, 7, 4)
    kwargs = dict(extra)
    if extra:
        kwargs.setdefault("cu_seq_lens_q", torch.tensor([0, 2, 7], dtype=torch.int32))
    mask = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    build_packed_attention(original)(_Module(1), q, q, q, mask, **kwargs)
    assert seen == [(q.shape, mask, set(kwargs))]

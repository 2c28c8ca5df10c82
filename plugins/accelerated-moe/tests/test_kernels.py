"""Grouped expert GEMMs and the MoE MLP against a per-token plain-PyTorch reference: the
PyTorch path everywhere, the Triton kernels in the interpreter (or on CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fms_acceleration_moe.kernels import (
    backend,
    expert_rows,
    experts_mlp,
    gated,
    group_by_expert,
    grouped_linear,
    swiglu,
    swiglu_and_grad,
)
from fms_acceleration_moe.kernels.grouped_gemm_triton import tile_table

BACKENDS = ("torch", "triton")
SILU_GATE = gated(F.silu)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def naive_moe(x, index, weights, gate_up, down):
    """Token by token, expert by expert: the definition of the MoE MLP."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate, up = (x[t].float() @ gate_up[e].float().T).chunk(2)
            out[t] += weights[t, j].float() * ((F.silu(gate) * up) @ down[e].float().T)
    return out


def _inputs(tokens, hidden, inter, experts, top_k, dtype, skip_last=True):
    x = torch.randn(tokens, hidden).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter) / inter**0.5).to(dtype)
    # the last expert receives no token when skip_last (an empty group)
    choices = experts - 1 if skip_last else experts
    index = torch.stack([torch.randperm(choices)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k), dim=-1).to(dtype)
    return x, gate_up, down, index, weights


def test_group_by_expert_sorts_stably_and_counts(seed):
    index = torch.tensor([[2, 0], [2, 1], [0, 2], [1, 0]])
    groups = group_by_expert(index, num_experts=4)
    assert groups.experts.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert groups.pairs.tolist() == [1, 4, 7, 3, 6, 0, 2, 5]
    assert groups.tokens.tolist() == [0, 2, 3, 1, 3, 0, 1, 2]
    assert groups.offsets.tolist() == [0, 3, 5, 8, 8]
    assert groups.counts().tolist() == [3, 2, 3, 0]


def test_tile_table_covers_every_row_once():
    offsets = torch.tensor([0, 70, 70, 75, 200])
    expert, first = tile_table(offsets, 200, 64)
    real = expert < 4
    assert expert.numel() == 4 + 4  # ceil(200 / 64) + E
    assert list(zip(expert[real].tolist(), first[real].tolist())) == [
        (0, 0),
        (0, 64),
        (2, 70),
        (3, 75),
        (3, 139),
    ]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("gather,scatter", [(True, False), (False, True), (False, False)])
def test_grouped_linear_forward_and_backward(name, gather, scatter, seed):
    experts, n_in, n_out, rows = 5, 40, 72, 77  # odd sizes, tiles straddle expert borders
    counts = torch.tensor([20, 0, 31, 1, 25])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(23 if gather else rows, n_in, requires_grad=True)
    weight = torch.randn(experts, n_out, n_in, requires_grad=True)
    gather_idx = torch.randint(0, 23, (rows,)) if gather else None
    scatter_idx = torch.randperm(rows) if scatter else None
    with backend(name):
        y = grouped_linear(x, weight, offsets, gather_idx, scatter_idx)
    rows_in = x[gather_idx] if gather else x
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    expected = torch.einsum("ri,roi->ro", rows_in, weight[expert_of_row])
    if scatter:
        expected = torch.zeros_like(expected).index_copy(0, scatter_idx, expected)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight), grad)
    want = torch.autograd.grad(expected, (x, weight), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)
    assert got[1][1].abs().max() == 0  # the expert without rows has no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 3), (37, 40), (515, 1536)])
def test_swiglu_matches_autograd_gating(rows, inter, dtype, seed):
    # a column slice of a wider tensor: the packed input need not be contiguous
    wide = torch.randn(rows, 2 * inter + 5).to(dtype)
    packed = wide[:, 3 : 3 + 2 * inter]
    leaves = [packed.clone().requires_grad_(True), packed.clone().requires_grad_(True)]
    got, want = swiglu(leaves[0]), SILU_GATE(leaves[1])
    assert got.shape == (rows, inter)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same operations
    grad = torch.randn(rows, inter).to(dtype)
    (d_got,) = torch.autograd.grad(got, leaves[0], grad)
    (d_want,) = torch.autograd.grad(want, leaves[1], grad)
    assert d_got.abs().max() > 0
    torch.testing.assert_close(d_got, d_want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 3), (515, 1536)])
def test_swiglu_and_grad_match_the_function_and_its_backward(rows, inter, dtype, seed):
    packed = torch.randn(rows, 2 * inter).to(dtype).requires_grad_(True)
    grad = torch.randn(rows, inter).to(dtype)
    want = swiglu(packed)
    (d_want,) = torch.autograd.grad(want, packed, grad)
    got, d_got = swiglu_and_grad(packed.detach(), grad)
    assert got.shape == (rows, inter) and d_got.shape == (rows, 2 * inter)
    assert d_got.abs().max() > 0
    torch.testing.assert_close(got, want.detach(), atol=0, rtol=0)
    torch.testing.assert_close(d_got, d_want, atol=0, rtol=0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("gate", [SILU_GATE, swiglu], ids=["autograd-gate", "swiglu"])
@pytest.mark.parametrize(
    "tokens,experts,top_k",
    [(1, 4, 1), (37, 4, 1), (37, 6, 2), (53, 9, 8)],
    ids=["one-token-top1", "top1", "top2", "top8"],
)
def test_experts_mlp_matches_token_by_token_reference(name, gate, tokens, experts, top_k, seed):
    hidden, inter = 48, 40
    x, gate_up, down, index, weights = _inputs(tokens, hidden, inter, experts, top_k, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    with backend(name):
        out = experts_mlp(leaves[0], index, leaves[3], leaves[1], leaves[2], gate)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down, weights)]
    expected = naive_moe(ref_leaves[0], index, ref_leaves[3], ref_leaves[1], ref_leaves[2])
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, ref_leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32])
    # the unused expert gets exactly zero gradient
    assert got[1][experts - 1].abs().max() == 0 and got[2][experts - 1].abs().max() == 0


@pytest.mark.parametrize("name", BACKENDS)
def test_experts_mlp_bf16_within_bf16_tolerance(name, seed):
    x, gate_up, down, index, weights = _inputs(45, 64, 48, 4, 2, torch.bfloat16)
    with backend(name):
        out = experts_mlp(x, index, weights, gate_up, down, SILU_GATE)
    assert out.dtype == torch.bfloat16
    expected = naive_moe(x, index, weights, gate_up, down)
    torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])


def test_triton_and_torch_paths_agree_on_a_realistic_width(seed):
    # SmolLM2-135M width (576 / 1536) at a few tokens: multi-tile K and N loops
    x, gate_up, down, index, weights = _inputs(19, 576, 1536, 8, 2, torch.float32, False)
    with backend("torch"):
        expected = experts_mlp(x, index, weights, gate_up, down, SILU_GATE)
    with backend("triton"):
        out = experts_mlp(x, index, weights, gate_up, down, SILU_GATE)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_expert_lora_updates_match_merged_weights(name, seed):
    """LoRA on the gate half, the up half (per-expert adapters, 4.55) and the down projection
    (B a strided view, as peft's ParamWrapper stores it) equals merging W + s * B @ A."""
    from fms_acceleration_moe.kernels import ExpertLoRA

    tokens, hidden, inter, experts, top_k, rank = 29, 40, 24, 5, 2, 3
    x, gate_up, down, index, weights = _inputs(tokens, hidden, inter, experts, top_k, torch.float32)

    def small(*shape):  # adapters of a realistic size next to the base weights
        return torch.randn(*shape) * 0.2

    a_gate, a_up = small(experts, rank, hidden), small(experts, rank, hidden)
    b_gate, b_up = small(experts, inter, rank), small(experts, inter, rank)
    a_down = small(experts, rank, inter)
    b_down_flat = small(hidden, rank * experts)  # peft's lora_B: expert index fastest
    leaves = [t.requires_grad_(True) for t in (a_gate, b_gate, a_up, b_up, a_down, b_down_flat)]
    b_down = b_down_flat.view(hidden, rank, experts).permute(2, 0, 1)
    loras_up = [
        ExpertLoRA(a_gate, b_gate, 0.5, (0, inter)),
        ExpertLoRA(a_up, b_up, 0.25, (inter, 2 * inter)),
    ]
    with backend(name):
        out = experts_mlp(
            x, index, weights, gate_up, down, SILU_GATE, loras_up, [ExpertLoRA(a_down, b_down, 2.0)]
        )
    merged_up = gate_up + torch.cat([0.5 * b_gate @ a_gate, 0.25 * b_up @ a_up], dim=1)
    merged_down = down + 2.0 * b_down @ a_down
    expected = naive_moe(x, index, weights, merged_up, merged_down)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_expert_rows_of_presorted_rows_with_frozen_experts(name, seed):
    # rows already in expert order (no gather, no scatter), the experts frozen as under LoRA
    # on attention: only the input gets a gradient
    experts, hidden, inter = 5, 24, 40
    counts = torch.tensor([6, 0, 11, 1, 9])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(int(counts.sum()), hidden, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden) / hidden**0.5
    down = torch.randn(experts, hidden, inter) / inter**0.5
    with backend(name):
        rows = expert_rows(x, offsets, None, None, gate_up, down, swiglu)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts)
    gate, up = torch.einsum("rh,roh->ro", x, gate_up[expert_of_row]).chunk(2, dim=-1)
    expected = torch.einsum("ri,rhi->rh", F.silu(gate) * up, down[expert_of_row])
    torch.testing.assert_close(rows, expected, **TOL[torch.float32])
    grad = torch.randn_like(rows)
    (got,) = torch.autograd.grad(rows, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("name", BACKENDS)
def test_experts_mlp_under_autocast_computes_in_its_dtype(name, seed):
    # fp32 weights and rows in a bf16 autocast region (mixed-precision training): computed in
    # bf16 as autocast computes a Linear, with fp32 gradients for the fp32 leaves
    x, gate_up, down, index, weights = _inputs(29, 64, 48, 4, 2, torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (x, gate_up, down)]
    with backend(name), torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts_mlp(leaves[0], index, weights, leaves[1], leaves[2], swiglu)
    assert out.dtype == torch.bfloat16
    bf16 = [t.to(torch.bfloat16) for t in (x, weights, gate_up, down)]
    expected = naive_moe(bf16[0], index, *bf16[1:])
    torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])
    out.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad.dtype == torch.float32 and leaf.grad.abs().max() > 0

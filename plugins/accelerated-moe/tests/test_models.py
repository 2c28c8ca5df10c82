"""Every supported architecture, patched, gives the unpatched model's logits, loss gradients
and state dict (transformers 4.55's per-expert layout or 5.x's fused layout alike)."""

from __future__ import annotations

import copy

import pytest
import torch

from fms_acceleration import compat
from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin
from fms_acceleration_moe.kernels import backend
from fms_acceleration_moe.kernels.gating import SwiGLU
from fms_acceleration_moe.models import ARCHITECTURES

ARCHS = (
    "mixtral",
    "granitemoe",
    "granitemoeshared",
    "granitemoehybrid",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
)
STANZA = {"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 1}}}}}


def accelerate(model):
    framework = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    model, _ = framework.augmentation(model, None, (None,))
    return model, framework


def grads_in_original_layout(model) -> dict[str, torch.Tensor]:
    """Parameter gradients keyed like the model's state dict (4.55: per-expert keys)."""
    saved = {}
    for param in model.parameters():
        saved[param] = param.data
        param.data = param.grad if param.grad is not None else torch.zeros_like(param)
    try:
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        for param, data in saved.items():
            param.data = data


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_model_matches_unpatched(arch, make_moe, seed):
    model = make_moe(arch, seed=seed)
    reference = copy.deepcopy(model)
    model, framework = accelerate(model)
    spec = ARCHITECTURES[arch]
    expected = {f"scattermoe.experts.{spec.block}": 2}  # one per layer
    if not compat.fused_moe_experts():  # 4.55: the experts swapped, the block's forward too
        swaps_per_layer = 1 if spec.per_expert_names else 3  # Granite: ParallelExperts out
        expected[f"scattermoe.swap.{spec.block}"] = 2 * swaps_per_layer
        expected[f"scattermoe.block.{spec.block}"] = 2
    assert framework.model_patcher.counts() == expected
    ids = torch.randint(4, 96, (3, 13))  # 39 tokens: odd
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    _loss(model, ids).backward()
    _loss(reference, ids).backward()
    got = grads_in_original_layout(model)
    want = {n: p.grad for n, p in reference.named_parameters()}
    assert sorted(got) == sorted(reference.state_dict())
    for name, grad in want.items():
        torch.testing.assert_close(
            got[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    # the state dict is the original one, key for key and value for value
    original = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("mixtral", dict(num_experts_per_tok=1)),
        ("olmoe", dict(num_experts=8, num_experts_per_tok=8)),
        ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)),
    ],
    ids=["top1", "top8", "qwen2-renormalised"],
)
def test_routing_variants(arch, overrides, make_moe, seed):
    model = make_moe(arch, seed=seed, **overrides)
    reference = copy.deepcopy(model)
    model, _ = accelerate(model)
    ids = torch.randint(4, 96, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


# every token-expert row of both MoE layers: 2 layers x 2 x 11 tokens x top-2
@pytest.mark.parametrize("act,swiglu_rows", [("silu", 2 * 2 * 11 * 2), ("gelu", 0)])
def test_silu_gating_runs_the_swiglu_function_and_other_activations_their_own(
    act, swiglu_rows, make_moe, seed, monkeypatch
):
    model = make_moe("mixtral", seed=seed, hidden_act=act)
    reference = copy.deepcopy(model)
    model, _ = accelerate(model)
    rows = []
    forward = SwiGLU.forward
    monkeypatch.setattr(
        SwiGLU, "forward", staticmethod(lambda ctx, x: rows.append(len(x)) or forward(ctx, x))
    )
    ids = torch.randint(4, 96, (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
    assert sum(rows) == swiglu_rows
    torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_bf16_model_within_bf16_tolerance(make_moe, seed):
    model = make_moe("mixtral", seed=seed, dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    model, _ = accelerate(model)
    ids = torch.randint(4, 96, (2, 17))
    got, want = model(ids).logits.float(), reference(ids).logits.float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_triton_path_in_a_model(make_moe, seed):
    model = make_moe("qwen3_moe", seed=seed)
    reference = copy.deepcopy(model)
    model, _ = accelerate(model)
    ids = torch.randint(4, 96, (2, 7))
    with backend("triton"):
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_save_pretrained_reloads_into_plain_transformers(make_moe, tmp_path, seed):
    from transformers import AutoModelForCausalLM

    model = make_moe("qwen2_moe", seed=seed)
    model, _ = accelerate(model)
    with torch.no_grad():  # a "trained" model: move the expert weights
        for name, param in model.named_parameters():
            if "experts" in name:
                param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(4, 96, (2, 11))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)

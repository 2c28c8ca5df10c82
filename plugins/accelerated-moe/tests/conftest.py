"""Shared fixtures: tiny MoE models of every supported architecture, seeds, tolerances."""

from __future__ import annotations

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# tiny tensors on a shared 2-core machine: a second intra-op thread only spin-waits
torch.set_num_threads(1)

_COMMON = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=128,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
    num_experts_per_tok=2,
)
# per model_type: what makes the model tiny and gives it 4 experts of intermediate 40
TINY_MOE = {
    "mixtral": dict(_COMMON, intermediate_size=40, num_local_experts=4),
    "granitemoe": dict(_COMMON, intermediate_size=40, num_local_experts=4),
    "granitemoeshared": dict(
        _COMMON, intermediate_size=40, num_local_experts=4, shared_intermediate_size=24
    ),
    "granitemoehybrid": dict(
        _COMMON,
        intermediate_size=40,
        num_local_experts=4,
        shared_intermediate_size=24,
        layer_types=["attention", "attention"],
        mamba_n_heads=4,
        mamba_d_head=24,
    ),
    "qwen2_moe": dict(
        _COMMON,
        intermediate_size=40,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=24,
        num_experts=4,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        _COMMON,
        intermediate_size=40,
        moe_intermediate_size=40,
        num_experts=4,
        head_dim=12,
        norm_topk_prob=True,
    ),
    "olmoe": dict(_COMMON, intermediate_size=40, num_experts=4),
}


def tiny_moe_config(model_type: str, **overrides):
    """A tiny transformers config of a supported MoE architecture."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_MOE[model_type], **overrides})


def tiny_moe(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random-init tiny MoE causal LM; weights scaled so that activations stay O(1)."""
    from transformers import AutoModelForCausalLM

    from fms_acceleration.compat import dtype_kwargs

    torch.manual_seed(seed)
    config = tiny_moe_config(model_type, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture
def seed(request) -> int:
    """A seed that differs per test (from its node id) but is stable across runs."""
    value = sum(map(ord, request.node.nodeid)) % 10_000
    torch.manual_seed(value)
    return value


@pytest.fixture
def make_moe():
    return tiny_moe


@pytest.fixture
def moe_config():
    return tiny_moe_config

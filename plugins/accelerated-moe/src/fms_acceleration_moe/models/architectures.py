"""Which transformers MoE architectures are supported, and where their pieces live.

Adding an architecture is one MoeArchSpec line. transformers 5 gives every one of them the same
shape: a router module returning (logits, top-k weights, top-k experts) and an experts module
with fused 3-D `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) whose forward takes
(hidden, top_k_index, top_k_weights). transformers 4.55 routes inside the block's forward and
keeps experts either as a ModuleList of per-expert MLPs (Mixtral, Qwen-MoE, OLMoE) or as two
3-D `ParallelExperts` (the Granite family); the spec says which, and how that block routes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from fms_acceleration import AccelerationPluginConfigError

from ..errors import STANZA

# how transformers 4.55 turns router logits into top-k weights
SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, top-k, optional renormalisation
TOPK_SOFTMAX = "topk_softmax"  # top-k logits, softmax over those k (Granite)


@dataclass(frozen=True)
class MoeArchSpec:
    """Where an architecture's sparse MoE block and its parts live."""

    causal_lm: str
    module: str
    block: str
    """class of the sparse MoE block"""
    block_name: str
    """attribute of the decoder layer holding the block"""
    router: str
    """attribute of the block holding the router"""
    experts_config: str
    """config attribute with the number of experts"""
    intermediate_config: str
    """config attribute with the experts' intermediate size"""
    per_expert_names: tuple[str, str, str] | None = None
    """4.55 ModuleList experts: (gate, up, down) Linear names in each expert; None: 4.55 keeps
    Granite's ParallelExperts `input_linear` (gate and up stacked) and `output_linear`"""
    routing: str = SOFTMAX_TOPK
    """4.55 routing rule"""
    norm_topk_attr: str | None = None
    """4.55 block attribute that switches the renormalisation of the top-k weights (None:
    always renormalised)"""
    shared_expert: bool = False
    """4.55 block adds a sigmoid-gated `shared_expert` (Qwen2-MoE)"""
    needs: str | None = None
    """what the architecture needs beyond PyTorch to run on a CPU, if anything"""

    def modeling_module(self) -> ModuleType:
        """The transformers modeling module of this architecture."""
        return importlib.import_module(self.module)

    def block_class(self) -> type[torch.nn.Module]:
        """The sparse MoE block class in the installed transformers."""
        return getattr(self.modeling_module(), self.block)

    @property
    def expert_projection_names(self) -> tuple[str, ...]:
        """Names a peft target_modules may use for the expert projections of this model."""
        names = ("gate_up_proj", "down_proj")
        if self.per_expert_names is not None:
            return names + self.per_expert_names
        return (*names, "input_linear", "output_linear")


def _tf(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


def _granite(prefix: str, model_type: str) -> MoeArchSpec:
    return MoeArchSpec(
        causal_lm=f"{prefix}ForCausalLM",
        module=_tf(model_type),
        block=f"{prefix}MoE",
        block_name="block_sparse_moe",
        router="router",
        experts_config="num_local_experts",
        intermediate_config="intermediate_size",
        routing=TOPK_SOFTMAX,
    )


def _qwen_like(prefix: str, model_type: str, **extra) -> MoeArchSpec:
    return MoeArchSpec(
        causal_lm=f"{prefix}ForCausalLM",
        module=_tf(model_type),
        block=f"{prefix}SparseMoeBlock",
        block_name="mlp",
        router="gate",
        experts_config="num_experts",
        intermediate_config="moe_intermediate_size",
        per_expert_names=("gate_proj", "up_proj", "down_proj"),
        norm_topk_attr="norm_topk_prob",
        **extra,
    )


# keyed by config.model_type
ARCHITECTURES: dict[str, MoeArchSpec] = {
    "mixtral": MoeArchSpec(
        causal_lm="MixtralForCausalLM",
        module=_tf("mixtral"),
        block="MixtralSparseMoeBlock",
        block_name="block_sparse_moe",
        router="gate",
        experts_config="num_local_experts",
        intermediate_config="intermediate_size",
        per_expert_names=("w1", "w3", "w2"),
    ),
    "granitemoe": _granite("GraniteMoe", "granitemoe"),
    "granitemoeshared": _granite("GraniteMoeShared", "granitemoeshared"),
    "granitemoehybrid": _granite("GraniteMoeHybrid", "granitemoehybrid"),
    "qwen2_moe": _qwen_like("Qwen2Moe", "qwen2_moe", shared_expert=True),
    "qwen3_moe": _qwen_like("Qwen3Moe", "qwen3_moe"),
    "olmoe": MoeArchSpec(
        causal_lm="OlmoeForCausalLM",
        module=_tf("olmoe"),
        block="OlmoeSparseMoeBlock",
        block_name="mlp",
        router="gate",
        experts_config="num_experts",
        intermediate_config="intermediate_size",
        per_expert_names=("gate_proj", "up_proj", "down_proj"),
        norm_topk_attr="norm_topk_prob",
    ),
}

SUPPORTED_CAUSAL_LMS: frozenset[str] = frozenset(s.causal_lm for s in ARCHITECTURES.values())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def arch_spec_for(model: torch.nn.Module) -> MoeArchSpec:
    """The MoeArchSpec of a (possibly peft-wrapped) causal LM; a clear error otherwise."""
    base = unwrap_model(model)
    name = type(base).__name__
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    supported = ", ".join(sorted(SUPPORTED_CAUSAL_LMS))
    if spec is None or spec.causal_lm != name:
        has_experts = any(
            getattr(config, attr, None) for attr in ("num_local_experts", "num_experts")
        )
        why = (
            "is a mixture-of-experts model this plugin has no table entry for"
            if has_experts
            else "has no sparse mixture-of-experts block to accelerate"
        )
        raise AccelerationPluginConfigError(
            f"{STANZA}: model {name} (model_type {model_type!r}) {why}; supported: {supported}. "
            f"Remove the {STANZA} stanza for this model."
        )
    return spec


def num_experts(model: torch.nn.Module, spec: MoeArchSpec) -> int:
    """The number of experts in each MoE block of the model."""
    return int(getattr(unwrap_model(model).config, spec.experts_config))

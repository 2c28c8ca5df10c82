"""Which transformers architectures are supported, and where their patchable pieces live.

Adding an architecture is one ArchSpec line: the causal-LM class, its modeling module, its
RMSNorm class (None when it has none), whether the module defines apply_rotary_pos_emb, its
SwiGLU MLP class (dense, with gate_proj/up_proj/down_proj), for a MoE its experts class in
transformers 5 (packed 3-D gate_up_proj, whose gating goes through `_apply_gate`) and in 4.x
(one SwiGLU MLP module per expert, with its gate/up/down projection names), and for fused LoRA
its attention class (one that calls q/k/v_proj on the hidden states, then o_proj).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from fms_acceleration import AccelerationPluginConfigError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's patchable classes and rotary function live in transformers."""

    causal_lm: str
    module: str
    rms_norm: str | None = None
    rope: bool = False
    mlp: str | None = None
    experts: str | None = None
    expert_mlp: tuple[str, tuple[str, str, str]] | None = None  # 4.x: class, (gate, up, down)
    attention: str | None = None  # fused LoRA on q/k/v/o_proj (None: not supported)

    def modeling_module(self):
        """The transformers modeling module of this architecture."""
        return importlib.import_module(self.module)

    def rms_norm_class(self) -> type[torch.nn.Module] | None:
        """The RMSNorm class to patch, or None when the architecture has none."""
        return getattr(self.modeling_module(), self.rms_norm) if self.rms_norm else None

    def mlp_class(self) -> type[torch.nn.Module] | None:
        """The dense SwiGLU MLP class, or None."""
        return getattr(self.modeling_module(), self.mlp) if self.mlp else None

    def _defined(self, name: str | None) -> type[torch.nn.Module] | None:
        return getattr(self.modeling_module(), name, None) if name else None

    def experts_class(self) -> type[torch.nn.Module] | None:
        """The packed MoE experts class when this transformers defines it (5.x), else None."""
        return self._defined(self.experts)

    def expert_mlp_class(self) -> type[torch.nn.Module] | None:
        """The per-expert SwiGLU MLP class when this transformers defines it (4.x), else None."""
        return self._defined(self.expert_mlp[0] if self.expert_mlp else None)

    @property
    def experts_gate(self) -> str | None:
        """Dotted path of the MoE experts class's `_apply_gate`, or None."""
        return f"{self.module}.{self.experts}._apply_gate" if self.experts else None

    @property
    def rope_function(self) -> str | None:
        """Dotted path of the module attribute apply_rotary_pos_emb, or None."""
        return f"{self.module}.apply_rotary_pos_emb" if self.rope else None

    @property
    def loss_only(self) -> bool:
        """True when only the loss can be patched (no RMSNorm, rotary embedding or SwiGLU)."""
        return self.rms_norm is None and not self.rope and not self.has_swiglu

    @property
    def has_swiglu(self) -> bool:
        """Whether the architecture has a SwiGLU MLP or SwiGLU experts (in some release)."""
        return bool(self.mlp or self.experts or self.expert_mlp)


def _tf(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


# keyed by config.model_type
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        "LlamaForCausalLM",
        _tf("llama"),
        "LlamaRMSNorm",
        True,
        "LlamaMLP",
        attention="LlamaAttention",
    ),
    "mistral": ArchSpec(
        "MistralForCausalLM",
        _tf("mistral"),
        "MistralRMSNorm",
        True,
        "MistralMLP",
        attention="MistralAttention",
    ),
    "mixtral": ArchSpec(
        "MixtralForCausalLM",
        _tf("mixtral"),
        "MixtralRMSNorm",
        True,
        experts="MixtralExperts",
        expert_mlp=("MixtralBlockSparseTop2MLP", ("w1", "w3", "w2")),
        attention="MixtralAttention",
    ),
    "granite": ArchSpec(
        "GraniteForCausalLM",
        _tf("granite"),
        "GraniteRMSNorm",
        True,
        "GraniteMLP",
        attention="GraniteAttention",
    ),
    "granitemoe": ArchSpec(
        "GraniteMoeForCausalLM",
        _tf("granitemoe"),
        "GraniteMoeRMSNorm",
        True,
        experts="GraniteMoeExperts",
        attention="GraniteMoeAttention",
    ),
    "qwen2": ArchSpec(
        "Qwen2ForCausalLM",
        _tf("qwen2"),
        "Qwen2RMSNorm",
        True,
        "Qwen2MLP",
        attention="Qwen2Attention",
    ),
    "qwen3": ArchSpec(
        "Qwen3ForCausalLM",
        _tf("qwen3"),
        "Qwen3RMSNorm",
        True,
        "Qwen3MLP",
        attention="Qwen3Attention",
    ),
    # GPT-BigCode has LayerNorm, learned positions and a GELU MLP: the loss only
    "gpt_bigcode": ArchSpec("GPTBigCodeForCausalLM", _tf("gpt_bigcode")),
}

SUPPORTED_CAUSAL_LMS: frozenset[str] = frozenset(s.causal_lm for s in ARCHITECTURES.values())


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def arch_spec_for(model: torch.nn.Module) -> ArchSpec:
    """The ArchSpec of a (possibly peft-wrapped) causal LM; a clear error when unsupported."""
    base = unwrap_model(model)
    name = type(base).__name__
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if spec is None or spec.causal_lm != name:
        supported = ", ".join(sorted(SUPPORTED_CAUSAL_LMS))
        raise AccelerationPluginConfigError(
            f"plugins.*.fused_ops_and_kernels: architecture {name} (model_type "
            f"{model_type!r}) is not supported; supported: {supported}."
        )
    return spec

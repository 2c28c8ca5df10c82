"""Which transformers architectures are supported, and where their patchable pieces live.

Adding an architecture is one ArchSpec line: the causal-LM class, its modeling module, its
RMSNorm class (None when it has none) and whether the module defines apply_rotary_pos_emb.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from fms_acceleration import AccelerationPluginConfigError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's RMSNorm class and rotary function live in transformers."""

    causal_lm: str
    module: str
    rms_norm: str | None = None
    rope: bool = False

    def modeling_module(self):
        """The transformers modeling module of this architecture."""
        return importlib.import_module(self.module)

    def rms_norm_class(self) -> type[torch.nn.Module] | None:
        """The RMSNorm class to patch, or None when the architecture has none."""
        return getattr(self.modeling_module(), self.rms_norm) if self.rms_norm else None

    @property
    def rope_function(self) -> str | None:
        """Dotted path of the module attribute apply_rotary_pos_emb, or None."""
        return f"{self.module}.apply_rotary_pos_emb" if self.rope else None

    @property
    def loss_only(self) -> bool:
        """True when only the loss can be patched (no RMSNorm, no rotary embedding)."""
        return self.rms_norm is None and not self.rope


def _tf(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


# keyed by config.model_type
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaForCausalLM", _tf("llama"), "LlamaRMSNorm", True),
    "mistral": ArchSpec("MistralForCausalLM", _tf("mistral"), "MistralRMSNorm", True),
    "mixtral": ArchSpec("MixtralForCausalLM", _tf("mixtral"), "MixtralRMSNorm", True),
    "granite": ArchSpec("GraniteForCausalLM", _tf("granite"), "GraniteRMSNorm", True),
    "granitemoe": ArchSpec("GraniteMoeForCausalLM", _tf("granitemoe"), "GraniteMoeRMSNorm", True),
    "qwen2": ArchSpec("Qwen2ForCausalLM", _tf("qwen2"), "Qwen2RMSNorm", True),
    "qwen3": ArchSpec("Qwen3ForCausalLM", _tf("qwen3"), "Qwen3RMSNorm", True),
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
    spec = ARCHITECTURES.get(model_type)
    if spec is None or spec.causal_lm != name:
        supported = ", ".join(sorted(SUPPORTED_CAUSAL_LMS))
        raise AccelerationPluginConfigError(
            f"plugins.*.fused_ops_and_kernels: architecture {name} (model_type "
            f"{model_type!r}) is not supported; supported: {supported}."
        )
    return spec

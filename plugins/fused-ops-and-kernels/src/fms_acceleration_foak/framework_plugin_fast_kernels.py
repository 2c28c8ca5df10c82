"""The fused-ops-and-kernels plugin: Triton RMSNorm, RoPE, SwiGLU, cross-entropy, fused linear CE,
LoRA."""

from __future__ import annotations

from typing import Any

import torch

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    Requirement,
    StanzaModel,
    choice,
)

from .models import arch_spec_for, build_kernel_rules
from .models.architectures import SUPPORTED_CAUSAL_LMS, unwrap_model
from .models.rules import FUSED_CE

TRAINING_PATH = "training.fused_ops_and_kernels"
PEFT_PATH = "peft.quantization.fused_ops_and_kernels"
BASE_LAYERS = ("auto_gptq", "bitsandbytes")


class FusedOpsOptions(StanzaModel):
    """Either stanza; a key left out takes its default once both stanzas are merged.

    Only base_layer may be null (fms-hf-tuning's FusedLoraConfig defaults it to None); a
    null switch is refused, not read as "left out": the reference reads null as false, and most
    of these default to true here, so null would silently turn on what the user meant off.
    """

    base_layer: choice(*BASE_LAYERS) | None = None
    """quantized base layer the fused LoRA kernels target (the peft plugin's loader); default
    auto_gptq"""
    # the switches: None only when left out (pydantic does not validate a default)
    fused_lora: bool = None
    """fused LoRA forward/backward on quantized base layers; default false under training.,
    true under peft.quantization."""
    fast_loss: choice(True, False, FUSED_CE) = None
    """true: Triton cross-entropy; fused_ce_liger: fused lm_head + cross-entropy; default true"""
    fast_rms_layernorm: bool = None
    """Triton RMSNorm; default true"""
    fast_rope_embeddings: bool = None
    """Triton rotary embedding of q, k; default true"""
    fast_swiglu: bool = None
    """Triton SwiGLU in the MLPs (dense and MoE experts); default true"""
    fused_linear_loss: bool = None
    """legacy spelling of fast_loss: fused_ce_liger (needs fast_loss: false); default false"""


DEFAULTS = {
    "base_layer": "auto_gptq",
    "fast_loss": True,
    "fast_rms_layernorm": True,
    "fast_rope_embeddings": True,
    "fast_swiglu": True,
    "fused_linear_loss": False,
}


def merge_stanzas(stanzas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One set of options from one or both stanzas: switches are on if either turns them on;
    a value given differently in both is refused; what neither gives takes its default."""
    merged: dict[str, Any] = {}
    for path, body in stanzas.items():
        for key, value in body.items():
            if value is None:
                continue
            if key not in merged or merged[key] == value:
                merged[key] = value
            elif isinstance(value, bool) and isinstance(merged[key], bool):
                merged[key] = True
            else:
                first = next(p for p in stanzas if stanzas[p].get(key) == merged[key])
                raise AccelerationPluginConfigError(
                    f"plugins.{path}.{key}: {value!r} conflicts with plugins.{first}.{key}: "
                    f"{merged[key]!r}; give it once, or the same in both stanzas."
                )
    options = {**DEFAULTS, "fused_lora": PEFT_PATH in stanzas, **merged}
    if options.pop("fused_linear_loss"):
        if options["fast_loss"] is True and "fast_loss" in merged:
            raise AccelerationPluginConfigError(
                f"plugins.{next(iter(stanzas))}.fused_linear_loss: true conflicts with fast_loss: "
                f"true; set fast_loss: {FUSED_CE} (or fast_loss: false) and drop "
                "fused_linear_loss."
            )
        options["fast_loss"] = FUSED_CE
    return options


class FastKernelsAccelerationPlugin(AccelerationPlugin):
    """Patches norms, rotary embeddings, the loss and (optionally) LoRA forwards with kernels.

    Both stanzas may be given (fms-hf-tuning writes the fused-LoRA switches under
    peft.quantization. and the kernel switches under training.): they combine into one set.
    """

    require_packages = ("triton",)
    restricted_model_archs = SUPPORTED_CAUSAL_LMS
    order = 50

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        stanzas = {p: self.stanza(p) for p in (PEFT_PATH, TRAINING_PATH) if self.stanza(p)}
        stanzas = stanzas or {TRAINING_PATH: {}}
        self.path = next(iter(stanzas))
        self.options: dict[str, Any] = merge_stanzas(stanzas)

    @property
    def requires_augmentation(self) -> bool:
        return True

    def taken_slots(self) -> frozenset[str]:
        """Slots follow the switches that are on."""
        cfg = self.options
        slots = {
            "loss": bool(cfg["fast_loss"]),
            "rms_norm": cfg["fast_rms_layernorm"],
            "rope": cfg["fast_rope_embeddings"],
            "swiglu": cfg["fast_swiglu"],
            "lora_forward": cfg["fused_lora"],
        }
        return frozenset(slot for slot, on in slots.items() if on)

    def requirements(self) -> list[Requirement]:
        """fused_lora needs the accelerated-peft loader of the matching base layer."""
        if not self.options["fused_lora"]:
            return []
        base_layer = self.options["base_layer"]
        return [
            Requirement(
                slot="model_loader",
                providers=(base_layer,),
                reason=f"plugins.{self.path}.fused_lora with base_layer={base_layer}",
            )
        ]

    def augmentation(self, model: torch.nn.Module, train_args: Any, modifiable_args: tuple):
        """Register the patch rules for this model; the framework applies them afterwards."""
        cfg = self.options
        spec = arch_spec_for(model)
        mixed = getattr(train_args, "fp16", False) or getattr(train_args, "bf16", False)
        if (cfg["fused_lora"] or _is_quantized(model)) and not mixed:
            raise AccelerationPluginConfigError(
                f"plugins.{self.path}: a quantized base model (fused_lora="
                f"{str(cfg['fused_lora']).lower()}) trains only in mixed precision; set "
                "fp16=True or bf16=True in the TrainingArguments."
            )
        rules = []
        if cfg["fused_lora"]:
            from .lora import build_fused_lora_rules

            # first: a module both would patch (a LoRA MLP) takes the fused LoRA forward, which
            # runs the SwiGLU kernel itself (on a module, the first rule that matches wins)
            rules += build_fused_lora_rules(model, cfg["base_layer"])
        rules += build_kernel_rules(
            model,
            spec,
            cfg["fast_loss"],
            cfg["fast_rms_layernorm"],
            cfg["fast_rope_embeddings"],
            cfg["fast_swiglu"],
        )
        for rule in rules:
            self.model_patcher.register(rule)
        return model, modifiable_args


def _is_quantized(model: torch.nn.Module) -> bool:
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    return bool(
        getattr(base, "is_quantized", False)
        or getattr(base, "quantization_method", None)
        or getattr(config, "quantization_config", None)
    )


AccelerationPlugin.register_plugin(
    FastKernelsAccelerationPlugin,
    configuration_or_paths=[TRAINING_PATH, PEFT_PATH],
    plugin_id="fused_ops_and_kernels",
    schemas={TRAINING_PATH: FusedOpsOptions, PEFT_PATH: FusedOpsOptions},
    package_name="fms-acceleration-foak",
)

"""The fused-ops-and-kernels plugin: Triton RMSNorm, RoPE, SwiGLU, cross-entropy, fused linear CE,
LoRA."""

from __future__ import annotations

from typing import Any

import torch

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    Option,
    Requirement,
    Stanza,
)

from .models import arch_spec_for, build_kernel_rules
from .models.architectures import SUPPORTED_CAUSAL_LMS, unwrap_model
from .models.rules import FUSED_CE

TRAINING_PATH = "training.fused_ops_and_kernels"
PEFT_PATH = "peft.quantization.fused_ops_and_kernels"
BASE_LAYERS = ("auto_gptq", "bitsandbytes")


def _schema(fused_lora_default: bool) -> Stanza:
    return Stanza(
        base_layer=Option(
            str,
            default="auto_gptq",
            choices=BASE_LAYERS,
            doc="quantized base layer the fused LoRA kernels target (the peft plugin's loader)",
        ),
        fused_lora=Option(
            bool,
            default=fused_lora_default,
            doc="fused LoRA forward/backward on quantized base layers",
        ),
        fast_loss=Option(
            (bool, str),
            default=True,
            choices=(True, False, FUSED_CE),
            doc="true: Triton cross-entropy; fused_ce_liger: fused lm_head + cross-entropy",
        ),
        fast_rms_layernorm=Option(bool, default=True, doc="Triton RMSNorm"),
        fast_rope_embeddings=Option(bool, default=True, doc="Triton rotary embedding of q, k"),
        fast_swiglu=Option(
            bool, default=True, doc="Triton SwiGLU in the MLPs (dense and MoE experts)"
        ),
        fused_linear_loss=Option(
            bool,
            default=False,
            doc="legacy spelling of fast_loss: fused_ce_liger (needs fast_loss: false)",
        ),
    )


class FastKernelsAccelerationPlugin(AccelerationPlugin):
    """Patches norms, rotary embeddings, the loss and (optionally) LoRA forwards with kernels."""

    require_packages = ("triton",)
    restricted_model_archs = SUPPORTED_CAUSAL_LMS
    order = 50

    def __init__(self, configurations: dict[str, Any], require_packages_check: bool = True):
        super().__init__(configurations, require_packages_check)
        present = [p for p in (TRAINING_PATH, PEFT_PATH) if self.stanza(p) is not None]
        if len(present) != 1:
            raise AccelerationPluginConfigError(
                f"plugins: give exactly one of {TRAINING_PATH} and {PEFT_PATH}, "
                f"found {', '.join(present) or 'neither'}."
            )
        self.path = present[0]
        cfg = dict(self.stanza(self.path))
        if cfg.pop("fused_linear_loss"):
            if cfg["fast_loss"] is True:
                raise AccelerationPluginConfigError(
                    f"plugins.{self.path}.fused_linear_loss: true conflicts with fast_loss: true; "
                    f"set fast_loss: {FUSED_CE} (or fast_loss: false) and drop fused_linear_loss."
                )
            cfg["fast_loss"] = FUSED_CE
        self.options: dict[str, Any] = cfg

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
        rules = build_kernel_rules(
            model,
            spec,
            cfg["fast_loss"],
            cfg["fast_rms_layernorm"],
            cfg["fast_rope_embeddings"],
            cfg["fast_swiglu"],
        )
        if cfg["fused_lora"]:
            from .lora import build_fused_lora_rules

            rules += build_fused_lora_rules(model, cfg["base_layer"])
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
    schemas={TRAINING_PATH: _schema(False), PEFT_PATH: _schema(True)},
    package_name="fms-acceleration-foak",
)

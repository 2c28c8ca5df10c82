"""Fused LoRA for peft-wrapped models: plan which projections fuse, and ModelPatcher rules."""

from .rules import (
    FUSED_LORA_MODEL_TYPES,
    FusedLoRAPlan,
    build_fused_lora_rules,
    plan_fused_lora,
    rules_from_plan,
)

__all__ = [
    "FUSED_LORA_MODEL_TYPES",
    "FusedLoRAPlan",
    "build_fused_lora_rules",
    "plan_fused_lora",
    "rules_from_plan",
]

"""Reading peft LoRA layers: whether one can take the fused path, and its projection if so."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from ..kernels.fused_lora import FrozenBase, LoRAProjection
from .base_layers import frozen_base, unsupported_reason


def _dropout_p(dropout: torch.nn.Module) -> float:
    if isinstance(dropout, torch.nn.Identity):
        return 0.0
    return float(getattr(dropout, "p", 1.0))


def _active_here(module: LoraLayer) -> list[str]:
    # peft skips active adapters that have no weights on a layer, so only these count.
    return [a for a in module.active_adapters if a in module.lora_A]


def lora_skip_reason(module: torch.nn.Module) -> str | None:
    """Why this module cannot use fused LoRA (None when it can), judged on its current state."""
    if not isinstance(module, LoraLayer):
        return f"not a peft LoRA layer ({type(module).__name__})"
    active = _active_here(module)
    if len(active) != 1:
        return f"{len(active)} active adapters {active}; the fused path takes exactly one"
    name = active[0]
    if module.disable_adapters or module.merged:
        return "adapters are disabled or merged"
    if not isinstance(module.lora_A[name], torch.nn.Linear):
        return f"LoRA A of adapter '{name}' is a {type(module.lora_A[name]).__name__}"
    if name in getattr(module, "lora_variant", {}):
        return f"adapter '{name}' uses a LoRA variant ({type(module.lora_variant[name]).__name__})"
    if getattr(module, "lora_bias", {}).get(name, False):
        return f"adapter '{name}' has lora_bias=True"
    p = _dropout_p(module.lora_dropout[name])
    if p > 0:
        return f"adapter '{name}' has lora_dropout={p} (the fused path needs 0)"
    return unsupported_reason(module.get_base_layer())


def active_adapter(module: LoraLayer) -> str:
    """The one adapter a fusable layer runs (see lora_skip_reason)."""
    (name,) = _active_here(module)
    return name


def still_fusable(module: LoraLayer, adapter: str) -> bool:
    """Cheap per-call check that the layer still runs exactly `adapter`, unmerged and enabled."""
    return not module.disable_adapters and not module.merged and _active_here(module) == [adapter]


class LoRAProjectionSource:
    """Builds the LoRAProjection of one peft LoRA layer at call time (weights may be replaced)."""

    def __init__(self, module: LoraLayer, adapter: str):
        self.module = module
        self.adapter = adapter
        self.base: FrozenBase = frozen_base(module.get_base_layer())

    def __call__(self) -> LoRAProjection:
        m, a = self.module, self.adapter
        return LoRAProjection(self.base, m.lora_A[a].weight, m.lora_B[a].weight, m.scaling[a])

    def ready(self) -> bool:
        """Whether the layer may take the fused path on this call."""
        return still_fusable(self.module, self.adapter)

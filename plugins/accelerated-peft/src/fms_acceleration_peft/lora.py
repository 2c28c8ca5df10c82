"""Applying a LoRA config to a (quantized) base model."""

from __future__ import annotations

from typing import Any

from torch import nn


def apply_lora(model: nn.Module, peft_config: Any) -> nn.Module:
    """Wrap `model` with `peft_config` (a peft LoraConfig); only the LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(peft_config, LoraConfig):
        raise TypeError(
            "modifiable_args[0] must be a peft LoraConfig for 4-bit LoRA, got "
            f"{type(peft_config).__name__}"
        )
    return get_peft_model(model, peft_config)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the parameters that require grad."""
    return [name for name, param in model.named_parameters() if param.requires_grad]

"""Applying a LoRA config to a (quantized) base model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn


def apply_lora(
    model: nn.Module, peft_config: Any, lora_layers: Mapping[type, type] | None = None
) -> nn.Module:
    """Wrap `model` with `peft_config` (a peft LoraConfig); only the LoRA weights train.

    `lora_layers` maps base layer classes peft does not know to the LoRA layer class that
    wraps them (peft's custom-module dispatch); the caller's config is left unchanged.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(peft_config, LoraConfig):
        raise TypeError(
            "modifiable_args[0] must be a peft LoraConfig for 4-bit LoRA, got "
            f"{type(peft_config).__name__}"
        )
    if lora_layers:
        peft_config = copy.deepcopy(peft_config)
        peft_config._register_custom_module(dict(lora_layers))
    return get_peft_model(model, peft_config)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the parameters that require grad."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def embedding_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the input embedding and the output embedding (lm_head), if any."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [name for name, module in model.named_modules() if any(module is w for w in wanted)]


def lora_hits_on_embeddings(model: nn.Module, peft_config: Any) -> list[str]:
    """Embedding/lm_head module names a LoraConfig would adapt or train (modules_to_save)."""
    import re

    from peft.tuners.tuners_utils import check_target_module_exists

    hits = []
    saved = getattr(peft_config, "modules_to_save", None) or []
    token_indices = getattr(peft_config, "trainable_token_indices", None)
    for name in embedding_module_names(model):
        # the same rule peft uses to pick modules_to_save
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved):
            hits.append(f"{name} (modules_to_save)")
        elif peft_config.target_modules is not None and check_target_module_exists(
            peft_config, name
        ):
            hits.append(f"{name} (target_modules)")
    if token_indices:
        hits.append("the input embedding (trainable_token_indices)")
    return hits

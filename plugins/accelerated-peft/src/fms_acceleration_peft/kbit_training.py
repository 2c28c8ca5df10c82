"""Preparing a quantized model for LoRA training without upcasting it.

peft's `prepare_model_for_kbit_training` casts every fp16/bf16 parameter that is not a
Params4bit to fp32: norms, embeddings and an untied lm_head then cost twice the memory and make
every norm and head matmul run in fp32. Nothing needs that: the base is frozen, and the LoRA
weights peft adds are kept in fp32 by `get_peft_model` itself.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def freeze(model: nn.Module) -> int:
    """Freeze every parameter; return how many were trainable before."""
    count = 0
    for param in model.parameters():
        count += int(param.requires_grad)
        param.requires_grad_(False)
    return count


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Freeze the base, keep its dtypes, and set up gradient checkpointing when asked."""
    freeze(model)
    if gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        # Reentrant checkpointing only backpropagates into a segment whose inputs require grad;
        # with a frozen embedding nothing would, so the LoRA weights would get no gradient.
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def checkpointing_from_train_args(train_args: Any) -> tuple[bool, dict[str, Any] | None]:
    """(gradient_checkpointing, its kwargs) read from a TrainingArguments-like object or None."""
    if train_args is None:
        return False, None
    enabled = bool(getattr(train_args, "gradient_checkpointing", False))
    return enabled, getattr(train_args, "gradient_checkpointing_kwargs", None)

"""The augmentation both quantized-LoRA plugins share: take the LoraConfig, wrap, return None.

This module is the plugin-side glue (it raises the framework's config error); the computation
it calls lives in kbit_training.py and lora.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError

from .kbit_training import checkpointing_from_train_args, prepare_for_kbit_training
from .lora import apply_lora

# A plugin on this slot applies PEFT itself and returns None in place of the peft config.
PEFT_WRAPPING_SLOT = "peft_wrapping"


class QuantizedLoraPlugin(AccelerationPlugin):
    """What both quantized-LoRA plugins declare: they load the model and apply PEFT themselves."""

    slots = frozenset({PEFT_WRAPPING_SLOT})
    order = 10

    @property
    def requires_custom_loading(self) -> bool:
        return True

    @property
    def requires_augmentation(self) -> bool:
        return True


class MissingLoraConfigError(AccelerationPluginConfigError, AssertionError):
    """No LoRA config to apply (an AssertionError in the reference, which fms-hf-tuning's tests
    expect, so it is one here too)."""


def wrap_with_lora(
    model: Any,
    train_args: Any,
    modifiable_args: tuple,
    stanza: str,
    hint: str = "",
    lora_layers: Mapping[type, type] | None = None,
) -> tuple[Any, tuple]:
    """Apply modifiable_args[0] to the prepared model; return (peft model, (None, *rest)).

    `lora_layers`: LoRA layer classes for base layers peft does not dispatch itself."""
    from peft import LoraConfig

    peft_config = modifiable_args[0] if modifiable_args else None
    if not isinstance(peft_config, LoraConfig):
        got = "nothing" if peft_config is None else type(peft_config).__name__
        # "need peft_config ..." is the reference's wording, which fms-hf-tuning's tests match
        raise MissingLoraConfigError(
            f"plugins.{stanza}: need peft_config to install PEFT adapters: augmentation needs a "
            f"peft LoraConfig as modifiable_args[0], got {got}{hint}"
        )
    gradient_checkpointing, gc_kwargs = checkpointing_from_train_args(train_args)
    model = prepare_for_kbit_training(model, gradient_checkpointing, gc_kwargs)
    model = apply_lora(model, peft_config, lora_layers)
    return model, (None, *modifiable_args[1:])

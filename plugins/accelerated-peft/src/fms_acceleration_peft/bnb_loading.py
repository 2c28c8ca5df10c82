"""Loading a causal LM with its linear layers in 4-bit bitsandbytes (QLoRA base weights)."""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import torch
from torch import nn

from fms_acceleration.compat import dtype_kwargs

from .bnb_cpu_repack import disable_cpu_weight_repacking

QuantType = Literal["nf4", "fp4"]
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)


def bnb_4bit_config(quant_type: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for 4-bit QLoRA whose packed weights FSDP can shard.

    `bnb_4bit_quant_storage` is the compute dtype so every parameter of a decoder block has one
    floating dtype: FSDP flattens/all-gathers per dtype and refuses integer storage.
    """
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def _default_device_map() -> dict[str, Any] | None:
    """One accelerator per process when there is one; CPU loading needs no map."""
    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    return None


def load_4bit_model(
    model_name: str, quant_type: str, compute_dtype: torch.dtype, **kwargs: Any
) -> nn.Module:
    """Load `model_name` with every linear layer of its blocks as a bitsandbytes Linear4bit."""
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:
        raise ValueError(
            "quantization_config must not be passed to the bitsandbytes loader; it builds its own"
        )
    if "device_map" not in kwargs and (device_map := _default_device_map()) is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(
        model_name,
        **dtype_kwargs(compute_dtype),
        quantization_config=bnb_4bit_config(quant_type, compute_dtype),
        **kwargs,
    )
    disable_cpu_weight_repacking(model)
    return model


def count_4bit_linears(model: nn.Module) -> int:
    """How many bitsandbytes Linear4bit layers the model holds."""
    from bitsandbytes.nn import Linear4bit

    return sum(isinstance(m, Linear4bit) for m in model.modules())

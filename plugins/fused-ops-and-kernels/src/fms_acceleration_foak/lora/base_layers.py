"""Frozen base layers seen by the fused LoRA functions, as the core describes them.

A base layer is fused over when it is one of:
- a layer satisfying the core's DequantizableLinear protocol (accelerated-peft's GPTQLinear),
  which hands back its weight itself;
- a layer of a kind registered with the core (accelerated-peft registers bitsandbytes'
  Linear4bit and gptqmodel's layers when it is imported), read through the kind's dequantizer;
- a plain nn.Linear with a floating-point weight.

This plugin imports no quantization library and no other plugin; it only names the libraries'
top-level packages, to tell a user which plugin would describe their layers.
"""

from __future__ import annotations

import torch

from fms_acceleration.quantized_linear import (
    DequantizableLinear,
    quantized_layer_kind,
    quantized_layer_kinds,
)

from ..kernels.fused_lora import FrozenBase

PLAIN = "plain"
BITSANDBYTES = "bitsandbytes"
GPTQ = "auto_gptq"  # the YAML key stays auto_gptq (accelerated-peft's loader, or gptqmodel)
BASE_LAYER_KINDS = (PLAIN, BITSANDBYTES, GPTQ)
# DequantizableLinear.quant_method -> the base_layer value that names its loader
_KIND_OF_QUANT_METHOD = {"gptq": GPTQ}
# top-level package of a quantization library -> the base_layer value of its layers, for layers
# met while no installed plugin registered their kind
_KIND_OF_LIBRARY = {"bitsandbytes": BITSANDBYTES, "gptqmodel": GPTQ, "auto_gptq": GPTQ}
_PROVIDER = "fms-acceleration-peft"


def _is_plain(layer: torch.nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return (
        isinstance(layer, torch.nn.Linear)
        and isinstance(weight, torch.Tensor)
        and weight.is_floating_point()
    )


def base_layer_kind(layer: torch.nn.Module) -> str:
    """'plain', 'bitsandbytes' or 'auto_gptq' for what the layer is; its class path otherwise."""
    if isinstance(layer, DequantizableLinear):
        method = layer.quant_method
        return _KIND_OF_QUANT_METHOD.get(method, f"{method}:{type(layer).__name__}")
    kind = quantized_layer_kind(layer)
    if kind is not None:
        return kind.name
    if _is_plain(layer):
        return PLAIN
    return f"{type(layer).__module__}.{type(layer).__name__}"


def missing_provider_reason(layer: torch.nn.Module) -> str | None:
    """For a quantization library's layer whose kind no installed plugin registered: what to
    install; None otherwise."""
    library = type(layer).__module__.split(".")[0]
    wanted = _KIND_OF_LIBRARY.get(library)
    if wanted is None or any(kind.name == wanted for kind in quantized_layer_kinds()):
        return None
    return (
        f"{type(layer).__name__} is a {library} layer and no installed plugin describes how to "
        f"read its weight; install {_PROVIDER} (it registers {library} layers when imported)"
    )


def unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why this base layer cannot be dequantized by the fused path, or None when it can."""
    kind = None if isinstance(layer, DequantizableLinear) else quantized_layer_kind(layer)
    if kind is not None:
        reason = kind.unsupported_reason(layer)
        if reason is not None:
            return reason
    elif not isinstance(layer, DequantizableLinear) and not _is_plain(layer):
        return missing_provider_reason(layer) or (
            f"{type(layer).__name__} is not a plain, bitsandbytes-4bit or GPTQ linear layer"
        )
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.requires_grad:
        return "the base layer's bias is trainable"
    return None


def frozen_base(layer: torch.nn.Module) -> FrozenBase:
    """Wrap a supported base layer as a FrozenBase; ValueError naming the reason otherwise."""
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"cannot fuse LoRA over {type(layer).__name__}: {reason}")

    def get_bias() -> torch.Tensor | None:
        return layer.bias

    if isinstance(layer, DequantizableLinear):
        return FrozenBase(layer.dequantized_weight, get_bias, layer.out_features)
    kind = quantized_layer_kind(layer)
    if kind is not None:
        return FrozenBase(kind.dequantizer(layer), get_bias, layer.out_features)
    return FrozenBase(lambda: layer.weight, get_bias, layer.out_features)

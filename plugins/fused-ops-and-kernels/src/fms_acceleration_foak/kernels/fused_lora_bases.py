"""Frozen base layers seen by the fused LoRA functions: plain nn.Linear, bitsandbytes 4-bit
(`Linear4bit`, nf4/fp4, with or without double quantization) and GPTQ (accelerated-peft's
GPTQLinear, or gptqmodel's torch-dequant `TorchLinear` family).

Package layers are recognised by their class hierarchy's module path, so neither bitsandbytes
nor gptqmodel is imported unless a layer of theirs is actually present; layers of other plugins
by the core's DequantizableLinear protocol (they hand back their weight themselves).
"""

from __future__ import annotations

import torch

from .fused_lora import FrozenBase

PLAIN = "plain"
BITSANDBYTES = "bitsandbytes"
GPTQ = "auto_gptq"  # the YAML key stays auto_gptq (accelerated-peft's loader, or gptqmodel)
BASE_LAYER_KINDS = (PLAIN, BITSANDBYTES, GPTQ)
# DequantizableLinear.quant_method -> the base_layer value that names its loader
_KIND_OF_QUANT_METHOD = {"gptq": GPTQ}


def _mro_names(layer: torch.nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(layer).__mro__}


def _is_bnb_4bit(layer: torch.nn.Module) -> bool:
    return "bitsandbytes.nn.modules.Linear4bit" in _mro_names(layer)


def _is_gptq_torch(layer: torch.nn.Module) -> bool:
    return "gptqmodel.nn_modules.qlinear.torch.TorchLinear" in _mro_names(layer)


def _is_dequantizable(layer: torch.nn.Module) -> bool:
    # the protocol lives in the core; imported here, at call time, like bnb_cpu_layout below
    from fms_acceleration.quantized_linear import DequantizableLinear

    return isinstance(layer, DequantizableLinear)


def base_layer_kind(layer: torch.nn.Module) -> str:
    """'plain', 'bitsandbytes' or 'auto_gptq' for what the layer is; its class name otherwise."""
    if _is_dequantizable(layer):
        method = layer.quant_method
        return _KIND_OF_QUANT_METHOD.get(method, f"{method}:{type(layer).__name__}")
    module = type(layer).__module__
    if module.startswith("bitsandbytes"):
        return BITSANDBYTES if _is_bnb_4bit(layer) else f"bitsandbytes:{type(layer).__name__}"
    if module.startswith("gptqmodel"):
        return GPTQ
    if isinstance(layer, torch.nn.Linear):
        return PLAIN
    return f"{module}.{type(layer).__name__}"


def unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why this base layer cannot be dequantized by the fused path, or None when it can."""
    if (
        _is_dequantizable(layer)
        or _is_bnb_4bit(layer)
        or (
            isinstance(layer, torch.nn.Linear)
            and not type(layer).__module__.startswith("bitsandbytes")
        )
    ):
        bias = layer.bias
        if bias is not None and bias.requires_grad:
            return "the base layer's bias is trainable"
        return None
    if _is_gptq_torch(layer):
        if getattr(layer, "adapter", None) is not None:
            return "the GPTQ layer carries its own gptqmodel adapter"
        if getattr(layer, "online_full_had", False) or getattr(layer, "online_partial_had", False):
            return "the GPTQ layer applies an online Hadamard rotation"
        return None
    if type(layer).__module__.startswith("gptqmodel"):
        return (
            f"GPTQ kernel {type(layer).__name__} stores weights in its own layout; "
            "load the model with gptqmodel's torch backend (BACKEND.TORCH) to fuse"
        )
    return f"{type(layer).__name__} is not a plain, bitsandbytes-4bit or GPTQ linear layer"


def _bnb_dequantizer(layer: torch.nn.Module):
    import bitsandbytes.functional as bnbF
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    # bitsandbytes on AVX512-BF16 CPUs repacks the weight on the first no-grad eval forward
    # into a layout dequantize_4bit does not read; keep the standard layout instead.
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False

    def dequantize() -> torch.Tensor:
        # the repack inverse (and bnb 0.50's absmax fix-up) is the core's, shared with the
        # accelerated-peft loader that guards against the repack
        from fms_acceleration.bnb_cpu_layout import unpack_cpu_repacked

        fix_4bit_weight_quant_state_from_module(layer)
        unpack_cpu_repacked(layer)
        return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)

    return dequantize


def _gptq_dequantizer(layer: torch.nn.Module):
    def dequantize() -> torch.Tensor:
        # gptqmodel stores (in, out); g_idx repeats once per `num_itr` shard, as in its forward.
        num_itr = max(1, layer.g_idx.shape[0] // layer.in_features)
        return layer.dequantize_weight(num_itr=num_itr).t()

    return dequantize


def frozen_base(layer: torch.nn.Module) -> FrozenBase:
    """Wrap a supported base layer as a FrozenBase; ValueError naming the reason otherwise."""
    reason = unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"cannot fuse LoRA over {type(layer).__name__}: {reason}")

    def get_bias() -> torch.Tensor | None:
        return layer.bias

    if _is_dequantizable(layer):
        return FrozenBase(layer.dequantized_weight, get_bias, layer.out_features)
    if _is_bnb_4bit(layer):
        return FrozenBase(_bnb_dequantizer(layer), get_bias, layer.out_features)
    if _is_gptq_torch(layer):
        return FrozenBase(_gptq_dequantizer(layer), get_bias, layer.out_features)
    return FrozenBase(lambda: layer.weight, get_bias, layer.out_features)

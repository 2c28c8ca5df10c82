"""The quantized linear layers this package loads, described for the core's registry so that a
plugin fusing LoRA over them (fused-ops-and-kernels) can read their weights as floats.

Layers are recognised by their class hierarchy's module path: neither bitsandbytes nor gptqmodel
is imported until a dequantizer runs on one of their layers. This package's own GPTQLinear needs
no entry: it satisfies the core's DequantizableLinear protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fms_acceleration.quantized_linear import (
    QuantizedLayerKind,
    class_paths,
    register_quantized_layer,
)

from .bnb_cpu_repack import REPACK_FLAG, unpack_cpu_repacked

_BNB_4BIT = "bitsandbytes.nn.modules.Linear4bit"
_GPTQMODEL_LAYERS = "gptqmodel.nn_modules.qlinear."
_GPTQMODEL_TORCH = "gptqmodel.nn_modules.qlinear.torch.TorchLinear"


def _is_bnb_4bit(layer: torch.nn.Module) -> bool:
    return _BNB_4BIT in class_paths(layer)


def _bnb_4bit_dequantizer(layer: torch.nn.Module) -> Callable[[], torch.Tensor]:
    import bitsandbytes.functional as bnbF
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    # A no-grad eval forward would repack the weight into a layout dequantize_4bit cannot read.
    if hasattr(layer, REPACK_FLAG):
        setattr(layer, REPACK_FLAG, False)

    def dequantize() -> torch.Tensor:
        fix_4bit_weight_quant_state_from_module(layer)
        unpack_cpu_repacked(layer)  # repacked before the guard above was set
        return bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)

    return dequantize


def _is_gptqmodel_layer(layer: torch.nn.Module) -> bool:
    return any(path.startswith(_GPTQMODEL_LAYERS) for path in class_paths(layer))


def _gptqmodel_unsupported(layer: torch.nn.Module) -> str | None:
    if _GPTQMODEL_TORCH not in class_paths(layer):
        return (
            f"GPTQ kernel {type(layer).__name__} stores weights in its own layout; "
            "load the model with gptqmodel's torch backend (BACKEND.TORCH) to fuse"
        )
    if getattr(layer, "adapter", None) is not None:
        return "the GPTQ layer carries its own gptqmodel adapter"
    if getattr(layer, "online_full_had", False) or getattr(layer, "online_partial_had", False):
        return "the GPTQ layer applies an online Hadamard rotation"
    return None


def _gptqmodel_torch_dequantizer(layer: torch.nn.Module) -> Callable[[], torch.Tensor]:
    def dequantize() -> torch.Tensor:
        # gptqmodel stores (in, out); g_idx repeats once per `num_itr` shard, as in its forward.
        num_itr = max(1, layer.g_idx.shape[0] // layer.in_features)
        return layer.dequantize_weight(num_itr=num_itr).t()

    return dequantize


# `name` is the base_layer value of fused-ops-and-kernels that selects the layers (its YAML key
# for GPTQ stays auto_gptq, whichever package loaded them).
BNB_4BIT = QuantizedLayerKind("bitsandbytes", _is_bnb_4bit, _bnb_4bit_dequantizer)
GPTQMODEL = QuantizedLayerKind(
    "auto_gptq", _is_gptqmodel_layer, _gptqmodel_torch_dequantizer, _gptqmodel_unsupported
)
QUANTIZED_LAYER_KINDS = (BNB_4BIT, GPTQMODEL)


def register_quantized_layer_kinds() -> None:
    """Describe this package's quantized layers to the core (done when the package is imported)."""
    for kind in QUANTIZED_LAYER_KINDS:
        register_quantized_layer(kind)

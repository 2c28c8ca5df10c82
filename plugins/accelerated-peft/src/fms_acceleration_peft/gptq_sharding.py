"""Letting FSDP shard GPTQ layers: integer buffers become float-typed parameters.

FSDP only shards parameters, and FSDP2 all-gathers a block's parameters in one floating dtype.
A GPTQ QuantLinear keeps its packed weights (`qweight`, `qzeros`, `g_idx`: int32) and `scales`
as buffers, so they would be replicated on every rank. Here each becomes a frozen parameter
holding the same bytes viewed as the compute dtype; during forward the module sees its integer
tensors again through an instance attribute that shadows the parameter (no copy). That forward
is installed by the plugin through the framework's ModelPatcher, so undo reverts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

QUANTIZED_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
_ORIGINAL_DTYPES = "_fms_gptq_original_dtypes"


def _as_storage_param(tensor: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    # A view reinterprets the bytes along the last dim (no copy, exact round trip); that dim
    # must hold a whole number of `dtype` elements, true for int32 or fp32 into a 16-bit dtype.
    return nn.Parameter(tensor.contiguous().view(dtype), requires_grad=False)


def build_forward_with_original_views(module: nn.Module) -> Callable[..., Any]:
    """A forward (taking `self`) that runs the module's current forward on integer views."""
    forward = module.forward

    def forward_with_original_views(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        originals: dict[str, torch.dtype] = getattr(self, _ORIGINAL_DTYPES)
        for name, dtype in originals.items():
            stored = self._parameters[name]
            # FSDP replaces the parameter between forwards, so view what is there right now.
            self.__dict__[name] = stored if stored.dtype == dtype else stored.view(dtype)
        try:
            return forward(*args, **kwargs)
        finally:
            for name in originals:
                self.__dict__.pop(name, None)

    return forward_with_original_views


def quantized_tensors_as_parameters(
    model: nn.Module, dtype: torch.dtype, is_quant_linear: Callable[[nn.Module], bool]
) -> list[nn.Module]:
    """Turn the quantized buffers of every matching layer into `dtype` parameters; return the
    layers converted (they need build_forward_with_original_views as their forward)."""
    converted: list[nn.Module] = []
    for module in model.modules():
        if not is_quant_linear(module) or hasattr(module, _ORIGINAL_DTYPES):
            continue
        originals: dict[str, torch.dtype] = {}
        for name in QUANTIZED_TENSOR_NAMES:
            tensor = module._buffers.get(name)
            if tensor is None:
                continue
            originals[name] = tensor.dtype
            del module._buffers[name]
            module.register_parameter(name, _as_storage_param(tensor, dtype))
        setattr(module, _ORIGINAL_DTYPES, originals)
        converted.append(module)
    return converted

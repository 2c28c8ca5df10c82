"""Letting FSDP shard GPTQ layers: integer buffers become float-typed parameters.

FSDP only shards parameters, and FSDP2 all-gathers a block's parameters in one floating dtype.
A GPTQ QuantLinear keeps its packed weights (`qweight`, `qzeros`, `g_idx`: int32) and `scales`
as buffers, so they would be replicated on every rank. Here each becomes a frozen parameter
holding the same bytes viewed as the compute dtype; during forward the module sees its integer
tensors again through an instance attribute that shadows the parameter (no copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

QUANTIZED_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
_ORIGINAL_DTYPES = "_fms_gptq_original_dtypes"


def _as_storage_param(tensor: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    # A view reinterprets the bytes along the last dim (no copy, exact round trip); that dim
    # must hold a whole number of `dtype` elements, true for int32 or fp32 into a 16-bit dtype.
    return nn.Parameter(tensor.contiguous().view(dtype), requires_grad=False)


def _forward_with_original_views(forward: Callable, module: nn.Module) -> Callable:
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        originals: dict[str, torch.dtype] = getattr(module, _ORIGINAL_DTYPES)
        shadowed = []
        for name, dtype in originals.items():
            stored = module._parameters[name]
            # FSDP replaces the parameter between forwards, so view what is there right now.
            module.__dict__[name] = stored if stored.dtype == dtype else stored.view(dtype)
            shadowed.append(name)
        try:
            return forward(*args, **kwargs)
        finally:
            for name in shadowed:
                module.__dict__.pop(name, None)

    return wrapped


def quantized_tensors_as_parameters(
    model: nn.Module, dtype: torch.dtype, is_quant_linear: Callable[[nn.Module], bool]
) -> int:
    """Turn the quantized buffers of every matching layer into `dtype` parameters; count layers."""
    converted = 0
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
        module.forward = _forward_with_original_views(module.forward, module)
        converted += 1
    return converted

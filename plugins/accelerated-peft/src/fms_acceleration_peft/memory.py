"""Honest model memory: parameters, buffers and 4-bit quantization state, without double counts."""

from __future__ import annotations

import torch
from torch import nn


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    # bitsandbytes keeps absmax/code (and the nested state) on the QuantState, not as buffers.
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return []
    found = [getattr(state, "absmax", None), getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    return [t for t in found if isinstance(t, torch.Tensor)]


def tensor_bytes(model: nn.Module | list[nn.Module]) -> dict[str, int]:
    """Bytes held by a model (or modules), split into parameters, buffers and quant state.

    Storages shared between tensors (tied embeddings, quant-state codebooks) count once.
    """
    modules = model if isinstance(model, list) else [model]
    seen: set[int] = set()
    totals = {"parameters": 0, "buffers": 0, "quant_state": 0}

    def add(kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr() if storage.data_ptr() else id(tensor)
        if key in seen:
            return
        seen.add(key)
        totals[kind] += storage.nbytes()

    for root in modules:
        for param in root.parameters():
            add("parameters", param)
        for buffer in root.buffers():
            add("buffers", buffer)
        for module in root.modules():
            for tensor in _quant_state_tensors(module):
                add("quant_state", tensor)
    return totals


def model_bytes(model: nn.Module) -> int:
    """Total bytes of parameters, buffers and quantization state."""
    return sum(tensor_bytes(model).values())


def module_group_bytes(model: nn.Module, predicate) -> int:
    """Bytes of the modules for which predicate(qualified_name, module) holds (leaf modules)."""
    chosen = [
        module
        for name, module in model.named_modules()
        if next(module.children(), None) is None and predicate(name, module)
    ]
    return sum(tensor_bytes(chosen).values())

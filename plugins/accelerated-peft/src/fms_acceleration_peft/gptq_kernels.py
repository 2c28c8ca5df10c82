"""Choosing a trainable gptqmodel kernel (backend) that runs on the current device."""

from __future__ import annotations

import warnings

import torch

# The reference project's name for the Triton kernel with a backward pass.
REFERENCE_KERNEL = "triton_v2"

# gptqmodel backends whose QuantLinear declares SUPPORTS_TRAINING (7.6.0), by user-facing name.
TRAINABLE_KERNELS = {
    "triton_v2": "gptq_triton",
    "triton": "gptq_triton",
    "gptq_triton": "gptq_triton",
    "torch": "gptq_torch",
    "gptq_torch": "gptq_torch",
    "torch_fused": "gptq_torch_fused",
    "gptq_torch_fused": "gptq_torch_fused",
    "torch_aten": "gptq_torch_aten",
    "gptq_torch_aten": "gptq_torch_aten",
    "auto": "auto_trainable",
    "auto_trainable": "auto_trainable",
}
# Kernels that need a CUDA device; on CPU the plain torch kernel does the same math.
_CUDA_ONLY = {"gptq_triton"}
_CPU_FALLBACK = "gptq_torch"


def backend_for(kernel: str, device: torch.device | str | None = None) -> str:
    """The gptqmodel BACKEND value to load `kernel` with on `device` (default: cuda if any)."""
    if kernel not in TRAINABLE_KERNELS:
        raise ValueError(
            f"kernel={kernel!r} is not a GPTQ kernel that supports training; "
            f"use one of {', '.join(TRAINABLE_KERNELS)}"
        )
    backend = TRAINABLE_KERNELS[kernel]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type != "cuda" and backend in _CUDA_ONLY | {"auto_trainable"}:
        if backend in _CUDA_ONLY:
            warnings.warn(
                f"GPTQ kernel '{kernel}' needs CUDA; using the torch kernel on {device_type}",
                stacklevel=2,
            )
        return _CPU_FALLBACK
    return backend


def group_size_for(model_name: str, preferred: tuple[int, ...] = (128, 64, 32, 16)) -> int:
    """The largest preferred GPTQ group size dividing the model's hidden and MLP widths."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name)
    widths = [getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)]
    widths = [w for w in widths if isinstance(w, int)]
    for size in preferred:
        if all(w % size == 0 for w in widths):
            return size
    return -1  # one group per row always fits

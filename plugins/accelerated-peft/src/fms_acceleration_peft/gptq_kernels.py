"""The GPTQ kernels the `auto_gptq` stanza can name, and who provides each.

Our own kernels need no GPTQ package: `triton_v2` (the reference's name; the fused Triton
dequantize-matmul on CUDA, the torch kernel elsewhere) and `torch`. gptqmodel's trainable
backends are optional accelerated paths, used only when named and installed.
"""

from __future__ import annotations

import warnings

import torch

# The reference project's name for the Triton kernel with a backward pass; the default.
REFERENCE_KERNEL = "triton_v2"
# our kernels -> the GPTQLinear path they run
OWN_KERNELS = {"triton_v2": "auto", "torch": "torch"}
# gptqmodel BACKEND values whose QuantLinear declares SUPPORTS_TRAINING (gptqmodel 7.6)
GPTQMODEL_KERNELS = (
    "gptq_triton",
    "gptq_torch",
    "gptq_torch_fused",
    "gptq_torch_aten",
    "auto_trainable",
)
KERNELS = (*OWN_KERNELS, *GPTQMODEL_KERNELS)
# gptqmodel kernels that need CUDA; on CPU its torch kernel does the same math
_GPTQMODEL_CUDA_ONLY = {"gptq_triton"}


def own_path(kernel: str, device: torch.device | str) -> str:
    """The GPTQLinear path ('auto' or 'torch') for one of our kernels on `device`."""
    if kernel not in OWN_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(OWN_KERNELS)}")
    if kernel == REFERENCE_KERNEL and torch.device(device).type != "cuda":
        warnings.warn(
            f"GPTQ kernel '{kernel}' is a Triton kernel for CUDA; on {torch.device(device).type} "
            "the torch kernel runs (same results)",
            stacklevel=2,
        )
    return OWN_KERNELS[kernel]


def gptqmodel_backend(kernel: str, device: torch.device | str) -> str:
    """The gptqmodel BACKEND value to load `kernel` with on `device`."""
    if kernel not in GPTQMODEL_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(GPTQMODEL_KERNELS)}")
    if torch.device(device).type != "cuda" and kernel in _GPTQMODEL_CUDA_ONLY | {"auto_trainable"}:
        if kernel in _GPTQMODEL_CUDA_ONLY:
            warnings.warn(
                f"gptqmodel kernel '{kernel}' needs CUDA; using gptqmodel's torch kernel",
                stacklevel=2,
            )
        return "gptq_torch"
    return kernel


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

"""Loading a GPTQ checkpoint through gptqmodel with a kernel that can train LoRA."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .gptq_kernels import backend_for

# gptqmodel's kernels that can train compute in half precision only (TorchLinear.SUPPORTS_DTYPES).
GPTQ_DTYPES = (torch.bfloat16, torch.float16)


def ensure_gptqmodel_cpu_workers() -> None:
    """Give gptqmodel's CPU thread pool at least 2 workers before it is first built.

    gptqmodel 7.6 defaults to ceil(cpus/2) CPU workers but its model-loader sub-pool asks for 2,
    so on a 2-core machine every load/quantize fails with "requests 2 workers but parent 'cpu'
    only has 1".
    """
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, ((os.cpu_count() or 1) + 1) // 2))


def default_device() -> torch.device:
    """This process's accelerator when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_gptq_quant_linear(module: nn.Module) -> bool:
    """True for any gptqmodel quantized linear layer."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def load_gptq_model(
    model_name: str,
    kernel: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a GPTQ checkpoint as a transformers model whose linears are gptqmodel layers."""
    if dtype not in GPTQ_DTYPES:
        raise ValueError(
            f"dtype={dtype} is not supported by the trainable GPTQ kernels; use bfloat16 or float16"
        )
    ensure_gptqmodel_cpu_workers()
    from gptqmodel import GPTQModel

    device = torch.device(device) if device is not None else default_device()
    backend = backend_for(kernel, device)
    for unsupported in ("quantization_config", "device_map"):
        if unsupported in kwargs:
            raise ValueError(f"{unsupported} must not be passed to the GPTQ loader")
    wrapper = GPTQModel.load(model_name, backend=backend, device=device, dtype=dtype, **kwargs)
    return wrapper.model

"""Resolving the compute dtype a loader was asked for (`dtype=`, legacy `torch_dtype=`)."""

from __future__ import annotations

from typing import Any

import torch

_NAMED = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pop_requested_dtype(kwargs: dict[str, Any]) -> Any:
    """Remove and return the dtype a caller passed (`dtype` wins over legacy `torch_dtype`)."""
    legacy = kwargs.pop("torch_dtype", None)
    requested = kwargs.pop("dtype", None)
    return requested if requested is not None else legacy


def resolve_dtype(requested: Any, model_name: str, default: torch.dtype) -> torch.dtype:
    """A floating torch dtype from a dtype, its name, or "auto"/None (the checkpoint's dtype)."""
    if requested is None or requested == "auto":
        from transformers import AutoConfig

        from fms_acceleration import compat

        saved = compat.config_dtype(AutoConfig.from_pretrained(model_name))
        requested = saved if saved is not None else default
    if isinstance(requested, str):
        key = requested.removeprefix("torch.")
        if key not in _NAMED:
            raise ValueError(
                f"dtype={requested!r} is not a floating dtype; use one of {', '.join(_NAMED)}"
            )
        requested = _NAMED[key]
    if requested not in FLOAT_DTYPES:
        raise ValueError(f"dtype={requested} is not one of float32, bfloat16, float16")
    return requested

"""The grouped expert GEMM, one entry point for both implementations."""

from __future__ import annotations

import torch

from .dispatch import use_triton
from .grouped_gemm_torch import grouped_linear_torch


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
) -> torch.Tensor:
    """One linear per expert over rows sorted by expert, gather and scatter fused.

    x: (R, in), read at rows gather[i] (or row i when gather is None); weight: (E, out, in)
    (transformers' layout, any strides); offsets: (E + 1,) start of each expert's rows; the
    result has S = len(gather or x) rows, row scatter[i] (or i) holding x[gather[i]] @ W[e].T
    for the expert e whose rows include i.
    """
    if use_triton(x, weight):
        from .grouped_gemm_triton import GroupedLinearFunction

        return GroupedLinearFunction.apply(x, weight, offsets, gather, scatter)
    return grouped_linear_torch(x, weight, offsets, gather, scatter)

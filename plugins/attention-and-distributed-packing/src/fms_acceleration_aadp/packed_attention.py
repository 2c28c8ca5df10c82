"""Attention over a packed row without a [tokens, tokens] mask: each example on its own.

transformers builds a block-causal mask from the restarting position_ids when sdpa or eager
attention gets a packed row; that mask costs O(tokens^2) per layer however short the examples
are. Given the example boundaries (`cu_seq_lens_q`, which DataCollatorWithFlattening adds for
flash-attn), sdpa can run once per example with its causal flag instead (O(sum of length^2)),
and flash-attn's varlen kernel can run the whole row at once on CUDA. Anything else (a padded
batch, sliding windows, position biases, decoding) goes to the original function unchanged.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from typing import Any

import torch

from .flattening import FLASH_ATTN_KWARGS

AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]
_HALF = (torch.float16, torch.bfloat16)


def _boundaries(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> list[int] | None:
    """Example boundaries of a packed self-attention row, or None when the call is not one."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor) or query.shape[0] != 1:
        return None
    if kwargs.get("sliding_window") is not None or kwargs.get("position_bias") is not None:
        return None
    bounds = cu_q.tolist()
    if cu_k is not None and cu_k is not cu_q and cu_k.tolist() != bounds:
        return None
    if bounds[0] != 0 or bounds[-1] != query.shape[2] or key.shape[2] != query.shape[2]:
        return None
    return bounds


def flash_varlen_available(query: torch.Tensor) -> bool:
    """flash-attn's varlen kernel applies: CUDA, half precision, flash-attn installed."""
    return (
        query.is_cuda
        and query.dtype in _HALF
        and importlib.util.find_spec("flash_attn") is not None
    )


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    dropout: float,
    scaling: float | None,
    causal: bool,
) -> torch.Tensor:
    """One flash_attn_varlen_func call over the row; returns [1, tokens, heads, head_dim]."""
    from flash_attn import flash_attn_varlen_func

    # [1, heads, tokens, dim] -> [tokens, heads, dim]; flash-attn handles grouped kv heads
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    longest = max(b - a for a, b in itertools.pairwise(bounds))
    out = flash_attn_varlen_func(
        q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=causal
    )
    return out.unsqueeze(0)


def build_packed_attention(sdpa: AttentionFunction) -> AttentionFunction:
    """Wrap an sdpa attention function so packed rows are attended example by example."""

    def packed_sdpa_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        bounds = _boundaries(query, key, kwargs)
        if bounds is None:
            return sdpa(
                module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
            )
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if flash_varlen_available(query):
            out = _flash_varlen(query, key, value, bounds, dropout, scaling, causal)
            return out, None
        rest = {k: v for k, v in kwargs.items() if k not in FLASH_ATTN_KWARGS}
        # The row's block-causal mask (if the model built one) is exactly what attending within
        # each example computes, so it is not needed per example.
        pieces = [
            sdpa(
                module,
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                None,
                dropout,
                scaling,
                causal,
                **rest,
            )[0]
            for start, end in itertools.pairwise(bounds)
        ]
        return torch.cat(pieces, dim=1), None

    packed_sdpa_attention_forward.__wrapped__ = sdpa  # type: ignore[attr-defined]
    return packed_sdpa_attention_forward

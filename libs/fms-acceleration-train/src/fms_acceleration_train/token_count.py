"""Counting the non-padding tokens a run trains on, the same way on every transformers release.

The Trainer's own count differs by release (4.55 counts padding too; `"non_padding"` arrived in
4.57) and carries over from a resumed checkpoint, so a run's tokens/s would compare unlike
things. This counts at the model's input during training forwards: the attention mask's ones,
or every token of a batch without one (padding-free batches hold no padding).
"""

from __future__ import annotations

from typing import Any

import torch


class TrainingTokenCounter:
    """Counts the real tokens of every training forward of `model` until removed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tokens = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return  # evaluation forwards are not training tokens
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None:
            self.tokens += int(mask.sum())
        elif ids is not None:
            self.tokens += ids.numel()

    def remove(self) -> None:
        self._handle.remove()

"""Padding-free batches: the examples of a batch concatenated into one row.

transformers' DataCollatorWithFlattening does the work (position_ids restart at every example,
labels are the separator -100 at each example's first position, optional flash-attn
`cu_seq_lens_*` / `max_length_*` kwargs); this module adds checks of the rows it is given and the
test of whether a batch is packed. It never imports the framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100
# the kwargs DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds to a batch
FLASH_ATTN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class PaddingFreeDataError(ValueError):
    """A batch row cannot be flattened (not tokenized, or labels of another length)."""


def check_rows(features: Sequence[Any]) -> None:
    """Refuse rows DataCollatorWithFlattening would mangle, naming the row and the key."""
    if not features:
        raise PaddingFreeDataError("padding-free: the batch has no rows")
    with_labels = isinstance(features[0], Mapping) and "labels" in features[0]
    for index, row in enumerate(features):
        if not isinstance(row, Mapping) or "input_ids" not in row:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise PaddingFreeDataError(
                f"padding-free: batch row {index} has no 'input_ids' (got {keys}); the dataset "
                "must be tokenized before the collator flattens it"
            )
        if ("labels" in row) != with_labels:
            raise PaddingFreeDataError(
                f"padding-free: batch row {index} {'has' if 'labels' in row else 'lacks'} "
                "'labels' unlike row 0; give every row labels or none"
            )
        if with_labels and len(row["labels"]) != len(row["input_ids"]):
            raise PaddingFreeDataError(
                f"padding-free: batch row {index} has {len(row['labels'])} labels for "
                f"{len(row['input_ids'])} input_ids; they must be of equal length"
            )


class FlatteningCollator:
    """transformers' DataCollatorWithFlattening that checks its rows first (see `check_rows`).

    It holds the collator instead of subclassing it: importing it imports transformers' data
    package, which on transformers 4.55 imports scikit-learn, and plugin discovery imports this
    module whether or not padding-free is configured."""

    def __init__(self, **kwargs: Any) -> None:
        from transformers import DataCollatorWithFlattening

        self.collator = DataCollatorWithFlattening(**kwargs)

    def __call__(
        self, features: Sequence[Any], return_tensors: str | None = None, separator_id=None
    ) -> dict[str, Any]:
        check_rows(features)
        return self.collator(features, return_tensors, separator_id)


def is_packed(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether some row holds more than one example: its positions restart inside the row.

    With a 2-D attention mask only attended neighbours count, so the positions a padded batch
    gives its padding (e.g. left padding in generation) are not taken for a restart.
    """
    if position_ids.shape[-1] < 2:
        return False
    jumps = position_ids.diff(dim=-1) != 1
    if attention_mask is not None and attention_mask.ndim == 2:
        attended = attention_mask.bool()
        jumps = jumps & attended[..., 1:] & attended[..., :-1]
    return bool(jumps.any())

"""One category's data as an endless, resumable stream of samples.

A sized dataset (a list, a datasets.Dataset, a map-style torch Dataset) is read in order and
restarted when exhausted; its position is one integer. An iterable one is re-iterated when
exhausted; on restore it is iterated again and the already-taken samples are skipped, so it must
yield the same sequence on every pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..errors import ODMConfigError


def sized_length(data: Any) -> int | None:
    """len(data) for a sized, indexable dataset; None for an iterable (or a __len__ that
    does not return an int, as some IterableDatasets have)."""
    if isinstance(data, torch.utils.data.IterableDataset) or not hasattr(data, "__getitem__"):
        return None
    try:
        length = len(data)
    except TypeError:
        return None
    return length if isinstance(length, int) else None


def single_sample(sample: Any) -> Any:
    """A row as the Trainer's collator expects it.

    A batch of one from a category's collator is unbatched as the reference did: input_ids,
    attention_mask (ones when absent) and labels (a list; input_ids when absent). A bare tensor
    is a sequence of token ids. A row without a collator is passed on unchanged.
    """
    if isinstance(sample, torch.Tensor):
        ids = sample[0] if sample.dim() > 1 else sample
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return dict(sample) if isinstance(sample, Mapping) else sample


def unbatch_one(batch: Mapping[str, Any] | torch.Tensor) -> dict[str, Any]:
    """The first row of a collated batch of one (the reference's sample format)."""
    if isinstance(batch, torch.Tensor):
        return single_sample(batch)
    ids = batch["input_ids"][0]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    return {
        "input_ids": ids,
        "attention_mask": mask[0] if mask is not None else torch.ones_like(ids),
        "labels": labels[0].tolist() if labels is not None else ids,
    }


class CategoryStream:
    """The samples of one category, endlessly, with `taken` as its whole position."""

    def __init__(self, name: str, data: Any, collator: Callable[[list], Any] | None) -> None:
        self.name = name
        self.data = data
        self.collator = collator
        self.length = sized_length(data)
        if self.length == 0:
            raise ODMConfigError(f"dataset_dict[{name!r}]: the category has no data (0 rows)")
        self.taken = 0
        # for an iterable: samples per pass, known once it was exhausted
        self.pass_length: int | None = None
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # index within the current pass of an iterable

    def position(self) -> int:
        """Index of the next sample within its pass (the row index for a sized dataset)."""
        if self.length is not None:
            return self.taken % self.length
        return self.taken % self.pass_length if self.pass_length else self.taken

    def next(self) -> tuple[Any, int]:
        """(the next sample in the Trainer's row format, its index within the pass)."""
        index = self.position()
        row = self.data[index] if self.length is not None else self._next_from_iterable()
        self.taken += 1
        sample = unbatch_one(self.collator([row])) if self.collator else single_sample(row)
        return sample, index

    def _next_from_iterable(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.data)
            self._position = 0
            for _ in range(self.position()):
                self._advance()
        return self._advance()

    def _advance(self) -> Any:
        try:
            row = next(self._iterator)  # type: ignore[arg-type]
        except StopIteration:
            if self._position == 0:
                raise ODMConfigError(
                    f"dataset_dict[{self.name!r}]: the category has no data (its iterable "
                    "yielded nothing)"
                ) from None
            self.pass_length = self._position
            self._iterator = iter(self.data)
            self._position = 0
            row = next(self._iterator)
        self._position += 1
        return row

    def restore(self, taken: int, pass_length: int | None) -> None:
        """Continue from position `taken` (an iterable is re-read up to there on next use)."""
        self.taken = taken
        self.pass_length = pass_length if pass_length is not None else self.pass_length
        self._iterator = None

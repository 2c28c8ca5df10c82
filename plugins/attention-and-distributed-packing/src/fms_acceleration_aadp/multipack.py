"""Multipack: steps of about equal token counts, split over the processes by token count.

Per epoch the examples are shuffled (seed + epoch) and cut into a fixed number of consecutive
groups of about equal token sums, one group per step; each group is split into one bin per
process with the `binpacking` library (longest first, each to the least-loaded bin). So every
process gets about the same number of tokens at every step, every example is used exactly once
per epoch, and the number of steps per epoch does not change between epochs. Nothing here
imports the framework.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import binpacking
from torch.utils.data import DataLoader, Sampler

# a datasets.Dataset is measured in parallel only with at least this many rows per process
ROWS_PER_PROCESS = 1000


class MultipackError(ValueError):
    """The dataset or the settings cannot be packed as asked."""


def token_lengths(dataset: Any, num_processes: int = 1, column: str = "input_ids") -> list[int]:
    """Number of tokens of each example (`len(row[column])`), in dataset order.

    A `datasets.Dataset` large enough is measured with `num_processes` processes
    (`Dataset.map(num_proc=...)`); anything else with a length and rows that are mappings is
    measured here.
    """
    try:
        size = len(dataset)
    except TypeError:
        raise MultipackError(
            f"multipack needs a dataset with a length (map-style), got {type(dataset).__name__}"
        ) from None
    processes = min(num_processes, size // ROWS_PER_PROCESS)
    if processes > 1 and hasattr(dataset, "map") and column in getattr(dataset, "column_names", ()):
        measured = dataset.map(
            lambda batch: {"_multipack_length": [len(ids) for ids in batch[column]]},
            batched=True,
            num_proc=processes,
            remove_columns=list(dataset.column_names),
        )
        return [int(n) for n in measured["_multipack_length"]]
    lengths = []
    for index in range(size):
        row = dataset[index]
        try:
            lengths.append(len(row[column]))
        except (KeyError, TypeError, IndexError):
            raise MultipackError(
                f"multipack: example {index} has no '{column}' to measure (got "
                f"{type(row).__name__}); the dataset must be tokenized"
            ) from None
    return lengths


def number_of_steps(lengths: Sequence[int], num_replicas: int, tokens_per_rank: float) -> int:
    """Steps per epoch: enough that a step averages at most `tokens_per_rank` per process."""
    if num_replicas < 1:
        raise MultipackError(f"multipack: num_replicas must be >= 1, got {num_replicas}")
    if tokens_per_rank <= 0:
        raise MultipackError(f"multipack: tokens per process must be > 0, got {tokens_per_rank}")
    if len(lengths) < num_replicas:
        raise MultipackError(
            f"multipack: {len(lengths)} examples cannot give each of {num_replicas} processes "
            "one per step"
        )
    empty = next((i for i, n in enumerate(lengths) if n <= 0), None)
    if empty is not None:
        raise MultipackError(f"multipack: example {empty} has no tokens")
    # tolerance: a budget of batch_size x mean length must not round up to one more step
    wanted = math.ceil(sum(lengths) / (num_replicas * tokens_per_rank) - 1e-9)
    return max(1, min(wanted, len(lengths) // num_replicas))


def _cut(cumulative: list[int], steps: int, minimum: int) -> list[int]:
    """Boundaries of `steps` consecutive groups of about equal sums, each >= `minimum` long."""
    n, total = len(cumulative), cumulative[-1]
    bounds = [0]
    for k in range(1, steps):
        target = total * k / steps
        cut = bisect.bisect_left(cumulative, target) + 1  # the group reaches the target
        if cut > 1 and target - cumulative[cut - 2] < cumulative[cut - 1] - target:
            cut -= 1  # stopping one example short is closer to the target
        low, high = bounds[-1] + minimum, n - (steps - k) * minimum
        bounds.append(min(max(cut, low), high))
    bounds.append(n)
    return bounds


def pack_epoch(
    lengths: Sequence[int], num_replicas: int, tokens_per_rank: float, seed: int
) -> list[list[list[int]]]:
    """Indices per step and process (`[step][rank]`) of one epoch shuffled with `seed`."""
    steps = number_of_steps(lengths, num_replicas, tokens_per_rank)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    cumulative = list(itertools.accumulate(lengths[i] for i in order))
    bounds = _cut(cumulative, steps, num_replicas)
    epoch = []
    for step, (start, end) in enumerate(itertools.pairwise(bounds)):
        group = {index: lengths[index] for index in order[start:end]}
        bins = [list(b) for b in binpacking.to_constant_bin_number(group, num_replicas)]
        # The first bins get the longest examples; rotating which process takes which bin
        # keeps that from favouring one process over the epoch.
        epoch.append([bins[(rank + step) % num_replicas] for rank in range(num_replicas)])
    return epoch


class MultipackBatchSampler(Sampler[list[int]]):
    """Batch sampler of one process: its bin of every step (see `pack_epoch`)."""

    def __init__(
        self,
        lengths: Sequence[int],
        num_replicas: int,
        rank: int,
        tokens_per_rank: float,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise MultipackError(f"multipack: rank {rank} is not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.num_replicas = num_replicas
        self.rank = rank
        self.tokens_per_rank = tokens_per_rank
        self.seed = seed
        self.epoch = 0
        self._steps = number_of_steps(self.lengths, num_replicas, tokens_per_rank)

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next iteration with seed + epoch (the Trainer calls this every epoch)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This process's index lists of the current epoch."""
        seed = self.seed + self.epoch
        epoch = pack_epoch(self.lengths, self.num_replicas, self.tokens_per_rank, seed)
        return [step[self.rank] for step in epoch]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self._steps


class MultipackDataLoader(DataLoader):
    """A DataLoader over a MultipackBatchSampler that forwards `set_epoch` to it."""

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the next epoch (called by the Trainer at the start of each epoch)."""
        self.batch_sampler.set_epoch(epoch)

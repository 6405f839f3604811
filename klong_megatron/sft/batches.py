"""Global batches from a packed-window dataset, split over data-parallel ranks and micro-batches.

Dataflow: ``SampleOrder(len(ds), seed).indices(consumed_samples)`` -> ``global_batch_size`` indices per
step -> this DP rank's contiguous slice -> micro-batches of ``micro_batch_size`` -> ``collate``.
The data position is the single integer ``consumed_samples``; resuming from it replays the exact
order (the SampleOrder contract).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Batch = dict[str, Any]


@dataclass
class BatchPlan:
    """How one global batch is laid out: ``global = micro * num_microbatches * dp``."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    def __post_init__(self) -> None:
        per_step = self.micro_batch_size * self.dp_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"trainer.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"trainer.micro_batch_size x data-parallel size ({self.micro_batch_size} x {self.dp_size})"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def local_slice(self, global_indices: Sequence[int]) -> Sequence[int]:
        """This rank's share of one global batch (contiguous, ``global / dp`` indices)."""
        per_rank = self.global_batch_size // self.dp_size
        return global_indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]


def micro_batches(
    dataset: Sequence[Batch], indices: Sequence[int], micro_batch_size: int, collate: Callable[[list], Batch]
) -> list[Batch]:
    """Collated micro-batches over ``indices`` (whose length is a multiple of ``micro_batch_size``)."""
    return [
        collate([dataset[i] for i in indices[k : k + micro_batch_size]])
        for k in range(0, len(indices), micro_batch_size)
    ]


class GlobalBatches:
    """Iterates global batches of sample indices from a resumable order, tracking ``consumed_samples``."""

    def __init__(self, order_indices: Callable[[int], Iterator[int]], global_batch_size: int, start: int = 0):
        self._it = order_indices(start)
        self.global_batch_size = global_batch_size
        self.consumed_samples = start

    def next(self) -> list[int]:
        batch = list(itertools.islice(self._it, self.global_batch_size))
        self.consumed_samples += len(batch)
        return batch


def eval_batches(num_samples: int, global_batch_size: int, limit: int | None) -> list[list[int]]:
    """Sequential global batches over a held-out split of ``num_samples`` windows.

    A split smaller than one global batch wraps around (its samples count more than once); otherwise
    the last partial batch is dropped. ``limit`` caps the number of batches.
    """
    n = max(1, num_samples // global_batch_size)
    if limit is not None:
        n = min(n, limit)
    return [[(k * global_batch_size + j) % num_samples for j in range(global_batch_size)] for k in range(n)]

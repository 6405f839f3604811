"""Several prepared datasets mixed by weight or by epochs (megatron-core's ``BlendedDataset`` is the model).

A blend repeats a *cycle* of ``N`` samples in which source ``d`` (``n_d`` packed sequences) has ``c_d``:
- weights: ``N = sum n_d`` (a cycle is as long as all sources together), ``c_d = round(w_d / sum w * N)``;
- epochs:  ``c_d = round(epochs_d * n_d)``, ``N = sum c_d`` (0.5 = half of the source per cycle, 3 = three passes).
The positions of a cycle go to the sources by megatron-core's ``build_exhaustive_blending_indices`` (exactly
``c_d`` each, interleaved so every prefix of the cycle is close to the mix). The ``k``-th draw from source
``d`` is ``SampleOrder(n_d, seed + d).epoch(k // n_d)[k % n_d]``: every sample once before any repeats, and a
cycle that takes part of a source continues where the previous one stopped.

Index space: sample ``s`` of source ``d`` is ``offsets[d] + s`` in :class:`ConcatDataset`; :class:`BlendOrder`
follows the ``SampleOrder`` contract (``indices(start)``: infinite, resumable from any position), so the trainer
needs no change. A one-source blend with epochs 1 is exactly ``SampleOrder(n, seed)`` (tested).

Deviation from Megatron: its blend has a fixed size (the run's train samples) and builds the indices once for
it; here the cycle repeats, which keeps the trainer's ``consumed_samples`` resume contract. Per rank the order
holds ``N`` int16 + int64 and one permutation per source (~10 bytes per packed sequence).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from megatron.core.datasets.helpers_cpp import build_exhaustive_blending_indices

from klong_megatron.data.dataset import SampleOrder


def cycle_counts(sizes: Sequence[int], weights: Sequence[float] | None, epochs: Sequence[float] | None) -> list[int]:
    """Samples per cycle of each source (see the module docstring); every count >= 1."""
    if epochs is not None:
        counts = [round(e * n) for e, n in zip(epochs, sizes, strict=True)]
    else:
        assert weights is not None
        total, wsum = sum(sizes), sum(weights)
        counts = [round(w / wsum * total) for w in weights]
    if min(counts) < 1:
        raise ValueError(
            f"data.blend: a source gets no sample per cycle (samples per cycle {counts}, sizes {list(sizes)})"
        )
    return counts


class BlendOrder:
    """Global sample order over a blend: ``indices(start)`` yields concatenated-dataset indices."""

    def __init__(self, sizes: Sequence[int], counts: Sequence[int], seed: int):
        self.sizes, self.counts = list(sizes), np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.cycle = int(self.counts.sum())
        self.source = np.zeros(self.cycle, np.int16)
        self.draw = np.zeros(self.cycle, np.int64)
        build_exhaustive_blending_indices(self.source, self.draw, self.counts, len(self.sizes))
        self.orders = [SampleOrder(n, seed + d) for d, n in enumerate(self.sizes)]
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _sample(self, d: int, k: int) -> int:
        epoch, r = divmod(k, self.sizes[d])
        if self._perm.get(d, (-1,))[0] != epoch:
            self._perm[d] = (epoch, self.orders[d].epoch(epoch))
        return int(self.offsets[d] + self._perm[d][1][r])

    def indices(self, start: int = 0) -> Iterator[int]:
        """Infinite stream of concatenated-dataset indices beginning at global position ``start``."""
        cycle, j = divmod(start, self.cycle)
        while True:
            for pos in range(j, self.cycle):
                d = int(self.source[pos])
                yield self._sample(d, int(self.draw[pos]) + cycle * int(self.counts[d]))
            cycle, j = cycle + 1, 0

    def realised(self, consumed: int) -> np.ndarray:
        """int64 [sources]: samples drawn from each source in the first ``consumed`` positions."""
        cycles, j = divmod(consumed, self.cycle)
        return cycles * self.counts + np.bincount(self.source[:j], minlength=len(self.sizes))


class ConcatDataset:
    """Sources one after another: index ``offsets[d] + s`` is sample ``s`` of source ``d``."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in self.datasets])])
        self.vocab_size = max(getattr(d, "vocab_size", 0) for d in self.datasets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Any:
        d = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.datasets[d][int(i - self.offsets[d])]


def mix_table(names: Sequence[str], order: BlendOrder, consumed: int | None = None) -> list[dict[str, Any]]:
    """One row per source: size, samples per cycle, share, epochs per cycle (and realised after ``consumed``)."""
    rows = []
    real = order.realised(consumed) if consumed else None
    for d, name in enumerate(names):
        row = {
            "source": name,
            "sequences": order.sizes[d],
            "per_cycle": int(order.counts[d]),
            "share": float(order.counts[d] / order.cycle),
            "epochs_per_cycle": float(order.counts[d] / order.sizes[d]),
        }
        if real is not None:
            row["realised_share"] = float(real[d] / max(1, consumed))
            row["realised_epochs"] = float(real[d] / order.sizes[d])
        rows.append(row)
    return rows

"""Packing: windows -> fixed-length sequences.

Best-fit decreasing (windows by decreasing length, each into the fullest bin that still has room)
in O(n log n). A packed sequence keeps per-window position ids (restarting at 0) and ``cu_seqlens``
so attention stays within a window: a block-diagonal causal mask on the local attention path, or
``PackedSeqParams(qkv_format="thd")`` with Transformer Engine. Padding forms its own segment.

Labels are next tokens within a window; the last token of every window (and padding) is not trained.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= ``capacity`` (best-fit decreasing).

    Deterministic: ties are broken by item index. Raises ValueError for an item longer than capacity.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], capacity: int) -> float:
    """Non-pad tokens / total tokens of the packed sequences."""
    return sum(lengths) / max(1, len(bins) * capacity)


@dataclass
class PackedSequence:
    """One packed training sequence of length S (numpy; the dataset turns it into tensors)."""

    tokens: np.ndarray
    """int64 [S]"""
    labels: np.ndarray
    """int64 [S]: next token within the window, pad elsewhere"""
    loss_mask: np.ndarray
    """float32 [S]: 1 where ``labels[t]`` is a trained token"""
    position_ids: np.ndarray
    """int64 [S]: restart at 0 for every window (and for the padding segment)"""
    cu_seqlens: np.ndarray
    """int32 [n_segments + 1]: segment boundaries, the padding segment included"""
    trajectory_ids: list[str]


def build_sequence(windows: Sequence[tuple[np.ndarray, np.ndarray, str]], seq_len: int, pad_id: int) -> PackedSequence:
    """Concatenate ``(input_ids, loss_mask, trajectory_id)`` windows and pad to ``seq_len``."""
    tokens = np.full(seq_len, pad_id, np.int64)
    labels = np.full(seq_len, pad_id, np.int64)
    loss = np.zeros(seq_len, np.float32)
    pos = np.zeros(seq_len, np.int64)
    cu = [0]
    for ids, mask, _ in windows:
        s, n = cu[-1], len(ids)
        tokens[s : s + n] = ids
        labels[s : s + n - 1] = ids[1:]
        loss[s : s + n - 1] = mask[1:]
        pos[s : s + n] = np.arange(n)
        cu.append(s + n)
    if cu[-1] < seq_len:
        pos[cu[-1] :] = np.arange(seq_len - cu[-1])
        cu.append(seq_len)
    return PackedSequence(tokens, labels, loss, pos, np.asarray(cu, np.int32), [t for _, _, t in windows])

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

import torch

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


# ----- packed THD micro-batches and their context-parallel partition ---------------------------------
# With Transformer Engine a micro-batch is one flat sequence ``[1, T]`` of packed segments described by
# ``cu_seqlens``. Context parallelism (CP) splits every segment into 2*CP chunks and gives CP rank r the
# chunks r and 2*CP-1-r (load balance under the causal mask), so every segment is first padded to a
# multiple of 2*CP: ``cu_seqlens`` keeps the real boundaries, ``cu_seqlens_padded`` the padded ones (TE
# skips the padding). References: megatron-core 0.16.1 ``megatron/core/utils.py``
# ``get_thd_batch_on_this_cp_rank`` and Transformer Engine's ``thd_partition_indices_kernel``
# (``transformer_engine/common/fused_attn/context_parallel.cu``), which this reimplements in torch
# because the TE op needs CUDA.

THD_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Indices (int64 ``[total_tokens / cp]``) of the tokens CP rank ``cp_rank`` holds, in TE's order.

    ``cu_seqlens_padded``: int ``[n + 1]``, every segment a multiple of ``2 * cp`` long. Segment ``s`` of
    padded length ``L`` contributes its chunks ``cp_rank`` and ``2*cp-1-cp_rank`` (``L / (2*cp)`` tokens each).
    """
    cu = cu_seqlens_padded.to(torch.int64)
    lengths = torch.diff(cu)
    if bool((lengths % (2 * cp)).any()) or int(cu[-1]) != total_tokens:
        raise ValueError(
            f"cu_seqlens_padded {cu.tolist()} must split {total_tokens} tokens into segments whose lengths "
            f"are multiples of 2*cp={2 * cp}"
        )
    chunk = lengths // (2 * cp)
    local_tok = torch.arange(total_tokens // cp)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths // cp)
    index = local_tok - (cu[:-1] // cp)[seg]
    second = index >= chunk[seg]
    offset = torch.where(second, 2 * cp - 1 - cp_rank, torch.full_like(index, cp_rank))
    return cu[:-1][seg] + chunk[seg] * offset + index - chunk[seg] * second


def pad_thd(
    batch: Batch, multiple: int, total_multiple: int | None = None, keys: tuple[str, ...] = THD_TOKEN_KEYS
) -> Batch:
    """Flatten a collated THD micro-batch ``[B, S]`` to ``[1, T]`` with every segment padded to ``multiple``.

    Input: ``tokens``/``labels``/``loss_mask``/``position_ids`` ``[B, S]`` and ``cu_seqlens`` int32 over
    the flattened ``B * S`` tokens. Output: the same keys ``[1, T]`` (padding: token and label 0, loss
    mask 0, positions continuing the segment's), ``cu_seqlens`` (cumulative real lengths, unchanged: TE's
    ``cu_seqlens_q``), ``cu_seqlens_padded`` (segment offsets in ``[1, T]``), ``max_seqlen`` (padded).
    ``total_multiple`` pads the last segment further so that T is a multiple of it (sequence parallelism
    splits T over TP ranks); it must be a multiple of ``multiple``. ``keys``: the per-token tensors to lay
    out (the RL loss adds its log-prob and advantage tensors; padding 0).
    """
    cu = batch["cu_seqlens"].to(torch.int64)
    lengths = torch.diff(cu)
    padded = -(-lengths // multiple) * multiple
    if total_multiple:
        assert total_multiple % multiple == 0, (total_multiple, multiple)
        padded[-1] += -int(padded.sum()) % total_multiple
    cu_padded = torch.cat([cu.new_zeros(1), padded.cumsum(0)])
    total = int(cu_padded[-1])
    dest = _real_token_slots(cu, cu_padded)
    out = {k: v for k, v in batch.items() if k not in (*keys, "cu_seqlens", "max_seqlen", "padding_mask")}
    for key in keys:
        flat = batch[key].reshape(-1)
        full = flat.new_zeros(total)
        full[dest] = flat
        out[key] = full.unsqueeze(0)
    if "padding_mask" in batch:  # the rows' fill and the padding added here (True = padding)
        padding = torch.ones(total, dtype=torch.bool)
        padding[dest] = batch["padding_mask"].reshape(-1)
        out["padding_mask"] = padding.unsqueeze(0)
    pad_seg = torch.repeat_interleave(torch.arange(len(lengths)), padded)
    in_seg = torch.arange(total) - cu_padded[:-1][pad_seg]
    start_pos = batch["position_ids"].reshape(-1)[cu[:-1]]
    out["position_ids"] = (start_pos[pad_seg] + in_seg).unsqueeze(0)  # padding continues each segment
    out["cu_seqlens"] = cu.to(torch.int32)  # TE: cumulative real lengths, without the padding offsets
    out["cu_seqlens_padded"] = cu_padded.to(torch.int32)
    out["max_seqlen"] = int(padded.max())
    return out


def thd_batch_for_cp_rank(
    batch: Batch, cp: int, cp_rank: int, *, sequence_parallel_tp: int = 1, keys: tuple[str, ...] = THD_TOKEN_KEYS
) -> Batch:
    """A collated THD micro-batch as CP rank ``cp_rank`` feeds it to the model.

    Pads (:func:`pad_thd`, segments to ``2*cp`` when ``cp > 1``; the total to ``2*cp*tp`` under sequence
    parallelism) and keeps this rank's ``T / cp`` tokens of every ``[1, T]`` tensor, as
    ``get_thd_batch_on_this_cp_rank`` does; ``cu_seqlens*`` stay global (TE's CP attention wants them so).
    """
    multiple = 2 * cp if cp > 1 else 1
    total_multiple = multiple * sequence_parallel_tp if sequence_parallel_tp > 1 else None
    out = pad_thd(batch, multiple, total_multiple, keys)
    if cp > 1:
        index = thd_partition_indices(out["cu_seqlens_padded"], out["tokens"].shape[1], cp, cp_rank)
        for key in (*keys, *(["padding_mask"] if "padding_mask" in out else [])):
            out[key] = out[key].index_select(1, index)
    return out


def _real_token_slots(cu: torch.Tensor, cu_padded: torch.Tensor) -> torch.Tensor:
    """Index in the padded ``[T]`` layout of every real token (int64 ``[cu[-1]]``, original order)."""
    cu, cu_padded = cu.to(torch.int64), cu_padded.to(torch.int64)
    lengths = torch.diff(cu)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return cu_padded[:-1][seg] + torch.arange(int(cu[-1])) - cu[:-1][seg]


def thd_unpartition(
    parts: list[torch.Tensor], cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`thd_batch_for_cp_rank` for one per-token tensor: ``[1, T_real]`` in the original order.

    ``parts[r]``: CP rank r's ``[1, T / cp]`` values (all CP ranks, e.g. from an all-gather); ``cu_seqlens`` /
    ``cu_seqlens_padded``: the batch's real and padded segment offsets. Padding tokens are dropped.
    """
    cu_seqlens, cu_seqlens_padded = cu_seqlens.cpu(), cu_seqlens_padded.cpu()  # index math on the host
    cp, total = len(parts), int(cu_seqlens_padded[-1])
    full = parts[0].new_zeros(total)
    for rank, part in enumerate(parts):
        index = thd_partition_indices(cu_seqlens_padded, total, cp, rank) if cp > 1 else torch.arange(total)
        full[index.to(full.device)] = part.reshape(-1)
    return full[_real_token_slots(cu_seqlens, cu_seqlens_padded).to(full.device)].unsqueeze(0)

"""Packed THD micro-batches split for context parallelism equal megatron-core's reference partition.

References: megatron-core 0.16.1 ``megatron/core/utils.py`` (``get_thd_batch_on_this_cp_rank``,
``get_batch_on_this_cp_rank``) and Transformer Engine's ``thd_partition_indices_kernel``
(``transformer_engine/common/fused_attn/context_parallel.cu``, behind ``tex.thd_get_partitioned_indices``).
The TE op needs CUDA, so ``_te_kernel_reference`` below transcribes that kernel thread by thread (shared
``cu_seqlens / world_size``, binary search, ``offset = rank`` or ``(world_size - 1) * 2 - rank``) and is
handed to megatron-core's own function in place of ``tex``.
"""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core import utils as mcore_utils

from klong_megatron.sft.batches import pad_thd, thd_batch_for_cp_rank, thd_partition_indices


def _te_kernel_reference(cu_seqlens: torch.Tensor, total_tokens: int, world_size: int, rank: int) -> torch.Tensor:
    """One loop iteration per CUDA thread of TE's ``thd_partition_indices_kernel``."""
    cu = [int(x) for x in cu_seqlens]
    assert all(x % (world_size * 2) == 0 for x in cu)
    cu_s = [x // world_size for x in cu]
    out = []
    for token_id in range(total_tokens // world_size):
        left, right = 1, len(cu_s) - 1  # binary_search(token_id, cu_seqlens_s, batch + 1)
        while left < right:
            mid = (left + right) // 2
            if cu_s[mid] <= token_id:
                left = mid + 1
            else:
                right = mid
        seq_id = left - 1
        seq_len = cu_s[seq_id + 1] - cu_s[seq_id]
        index = token_id - cu_s[seq_id]
        offset = rank if index < seq_len // 2 else (world_size - 1) * 2 - rank
        out.append(index + cu_s[seq_id] * world_size + seq_len // 2 * offset)
    return torch.tensor(out, dtype=torch.int64)


def _random_micro_batch(gen: torch.Generator, rows: int, seq_len: int) -> dict:
    """A collated THD micro-batch: ``rows`` packed rows of random segments (the last one padding)."""
    cus, tokens, positions = [0], [], []
    for b in range(rows):
        cuts = sorted(
            torch.randint(1, seq_len, (int(torch.randint(0, 5, (1,), generator=gen)),), generator=gen).tolist()
        )
        bounds = [0, *dict.fromkeys(cuts), seq_len]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            cus.append(b * seq_len + hi)
            positions.append(torch.arange(hi - lo))
        tokens.append(torch.randint(1, 1000, (seq_len,), generator=gen))
    tok = torch.stack(tokens)
    return {
        "tokens": tok,
        "labels": tok + 1,
        "loss_mask": (torch.rand(rows, seq_len, generator=gen) > 0.3).float(),
        "position_ids": torch.cat(positions).reshape(rows, seq_len),
        "cu_seqlens": torch.tensor(cus, dtype=torch.int32),
        "max_seqlen": max(b - a for a, b in zip(cus[:-1], cus[1:], strict=True)),
        "trajectory_ids": [["t"]] * rows,
    }


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_partition_indices_equal_te_kernel_on_random_cu_seqlens(cp: int) -> None:
    gen = torch.Generator().manual_seed(cp)
    for _ in range(20):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen) * 2 * cp
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        total = int(cu[-1])
        for rank in range(cp):
            assert torch.equal(thd_partition_indices(cu, total, cp, rank), _te_kernel_reference(cu, total, cp, rank))
        union = torch.cat([thd_partition_indices(cu, total, cp, r) for r in range(cp)])
        assert torch.equal(union.sort().values, torch.arange(total))  # every token on exactly one CP rank


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_batch_equals_megatron_get_thd_batch_on_this_cp_rank(monkeypatch, cp: int) -> None:
    tex = types.SimpleNamespace(thd_get_partitioned_indices=_te_kernel_reference)
    monkeypatch.setattr(mcore_utils, "tex", tex, raising=False)
    monkeypatch.setattr(mcore_utils, "is_te_min_version", lambda *a, **k: True)
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        batch = _random_micro_batch(gen, rows=2, seq_len=48)
        padded = pad_thd(batch, 2 * cp)
        for rank in range(cp):
            ours = thd_batch_for_cp_rank(batch, cp, rank)
            ref_in = {k: padded[k].clone() for k in ("tokens", "labels", "loss_mask", "position_ids")}
            ref, params = mcore_utils.get_thd_batch_on_this_cp_rank(
                ref_in,
                padded["cu_seqlens"],
                padded["cu_seqlens_padded"],
                torch.tensor([padded["max_seqlen"]]),
                cp,
                rank,
            )
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(ours[key], ref[key]), key
            assert torch.equal(ours["cu_seqlens"], params.cu_seqlens_q)
            assert torch.equal(ours["cu_seqlens_padded"], params.cu_seqlens_q_padded)
            assert ours["max_seqlen"] == params.max_seqlen_q


def test_one_segment_equals_megatron_get_batch_on_this_cp_rank(monkeypatch) -> None:
    """For one unpadded sequence THD's split is the plain 2*CP-chunk split Megatron uses for [B, S] data."""
    from megatron.core import parallel_state

    cp, seq = 2, 32
    tokens = torch.arange(seq).reshape(1, seq)
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(1, seq), "position_ids": tokens,
             "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32)}  # fmt: skip
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp)
    for rank in range(cp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda r=rank: r)
        ref = mcore_utils.get_batch_on_this_cp_rank({"tokens": tokens.clone()})
        assert torch.equal(thd_batch_for_cp_rank(batch, cp, rank)["tokens"], ref["tokens"])


def test_padding_keeps_every_real_token_and_trains_no_padding() -> None:
    gen = torch.Generator().manual_seed(3)
    for cp, sp_tp in [(1, 1), (2, 1), (2, 2), (4, 1)]:
        batch = _random_micro_batch(gen, rows=2, seq_len=40)
        out = pad_thd(batch, 2 * cp if cp > 1 else 1, 2 * cp * sp_tp if sp_tp > 1 else None)
        cu, cu_pad = out["cu_seqlens"].long(), out["cu_seqlens_padded"].long()
        assert bool((torch.diff(cu_pad) % (2 * cp if cp > 1 else 1) == 0).all())
        assert out["tokens"].shape[1] == int(cu_pad[-1]) and int(cu_pad[-1]) % (2 * cp * sp_tp if sp_tp > 1 else 1) == 0
        real = torch.cat([torch.arange(int(cu_pad[i]), int(cu_pad[i] + cu[i + 1] - cu[i])) for i in range(len(cu) - 1)])
        assert torch.equal(out["tokens"][0, real], batch["tokens"].reshape(-1))  # order kept
        assert out["loss_mask"].sum() == batch["loss_mask"].sum()  # padding carries no loss
        assert torch.equal(cu, batch["cu_seqlens"].long())  # TE's cu_seqlens: real lengths, no padding offsets
        shares = [thd_batch_for_cp_rank(batch, cp, r, sequence_parallel_tp=sp_tp)["loss_mask"].sum() for r in range(cp)]
        assert sum(shares) == batch["loss_mask"].sum()  # each trained token counted on exactly one CP rank


def test_bad_padding_names_the_lengths() -> None:
    with pytest.raises(ValueError, match="2\\*cp=4"):
        thd_partition_indices(torch.tensor([0, 6, 12], dtype=torch.int32), 12, 2, 0)

"""Packing, packed sequences, the Megatron dataset/collator and the resumable sample order."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_megatron.config.data import ContextPolicyConfig, DataConfig
from klong_megatron.data.dataset import SampleOrder, block_causal_mask, build_sft_datasets, collate
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES
from klong_megatron.data.pack import build_sequence, pack_lengths, packing_efficiency


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 100), min_size=1, max_size=300), st.integers(100, 400))
def test_packing_places_every_item_once_within_capacity(lengths: list[int], cap: int) -> None:
    bins = pack_lengths(lengths, cap)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert sum(load <= cap / 2 for load in loads) <= 1  # any-fit: no two bins could have been merged
    assert pack_lengths(lengths, cap) == bins  # deterministic


def test_packed_sequence_trains_next_tokens_within_windows_only() -> None:
    a, b = np.array([10, 11, 12, 13]), np.array([20, 21, 22])
    seq = build_sequence([(a, np.array([0, 1, 1, 0]), "x"), (b, np.array([0, 0, 1]), "y")], 10, pad_id=0)
    assert seq.tokens.tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    assert seq.labels[:3].tolist() == [11, 12, 13] and seq.labels[4:6].tolist() == [21, 22]
    assert seq.loss_mask.tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0, 0]  # label of t trained iff token t+1 is
    assert seq.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert seq.cu_seqlens.tolist() == [0, 4, 7, 10] and seq.trajectory_ids == ["x", "y"]


def test_block_causal_mask_equals_attending_each_window_alone() -> None:
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~block_causal_mask(cu, 12))
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], is_causal=True
        )
        torch.testing.assert_close(packed[..., s:e, :], alone)


def test_sample_order_is_seeded_and_resumable() -> None:
    order = SampleOrder(7, seed=3)
    first = [i for _, i in zip(range(30), order.indices(0), strict=False)]
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))
    assert first[:7] != first[7:14]  # a new permutation each epoch
    for start in (0, 5, 7, 13):
        resumed = [i for _, i in zip(range(30 - start), order.indices(start), strict=False)]
        assert resumed == first[start:]
    assert first == [i for _, i in zip(range(30), SampleOrder(7, seed=3).indices(0), strict=False)]


def test_datasets_are_deterministic_and_disjoint_by_trajectory(tmp_path) -> None:
    small = tmp_path / "t.jsonl"
    small.write_text("\n".join(sorted(DEMO_TRAJECTORIES.read_text().splitlines(), key=len)[:6]) + "\n")
    policy = ContextPolicyConfig(max_len=2048, overlap=256, keep_full_turns=4)
    cfg = DataConfig(train_files=[str(small)], valid_fraction=0.4, policy=policy, seq_len=4096)
    train, valid = build_sft_datasets(cfg, progress=False)
    assert len(train) > 0 and len(valid) > 0
    train_ids = {w.trajectory_id for w in train.windows}
    assert train_ids.isdisjoint({w.trajectory_id for w in valid.windows})
    item = train[0]
    assert item["tokens"].shape == (4096,) and item["tokens"].dtype == torch.int64
    assert int(item["tokens"].max()) < train.vocab_size
    assert item["loss_mask"].sum() > 0
    batch = collate([train[0], train[1]], attention="mask")
    assert batch["attention_mask"].shape == (2, 1, 4096, 4096) and batch["attention_mask"].dtype == torch.bool
    thd = collate([train[0], train[1]], attention="thd")
    assert thd["cu_seqlens"][-1] == 2 * 4096 and thd["cu_seqlens"].dtype == torch.int32
    again, _ = build_sft_datasets(cfg, progress=False)
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])
    lengths = [len(w) for w in train.windows]
    assert train.efficiency == packing_efficiency(lengths, train.bins, 4096)

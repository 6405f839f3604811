"""Torch dataset of packed trajectory windows for Megatron SFT.

Dataflow: trajectory JSONL -> ``Renderer`` -> ``ContextPolicy`` windows -> best-fit packing ->
``PackedWindowDataset`` items -> ``collate`` -> a batch with either a block-diagonal causal
``attention_mask`` (local attention) or ``cu_seqlens`` (THD, Transformer Engine).

Train/valid split is by trajectory (a stable hash of its id), so no window of a held-out trajectory
is trained on. Data order comes from ``SampleOrder``: a seeded permutation per epoch, resumable from
any global sample index. No torch.distributed here: the trainer slices batches per data-parallel rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import track

from klong_megatron.config.data import DataConfig
from klong_megatron.data.context import ContextPolicy, Window
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES
from klong_megatron.data.pack import PackedSequence, build_sequence, pack_lengths, packing_efficiency
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.split import SplitStats, split_trajectory
from klong_megatron.data.trajectory import ReadStats, read_trajectories


class PackedWindowDataset(torch.utils.data.Dataset):
    """Packed sequences of length ``seq_len``; item ``i`` is a dict of tensors (see ``PackedSequence``)."""

    def __init__(self, windows: Sequence[Window], seq_len: int, tokenizer: Any, stats: SplitStats | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.seq_len = seq_len
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.windows = list(windows)
        lengths = [len(w) for w in self.windows]
        self.bins = pack_lengths(lengths, seq_len)
        self.efficiency = packing_efficiency(lengths, self.bins, seq_len)
        self.stats = stats

    def __len__(self) -> int:
        return len(self.bins)

    def sequence(self, i: int) -> PackedSequence:
        ws = [self.windows[k] for k in self.bins[i]]
        return build_sequence([(w.input_ids, w.loss_mask, w.trajectory_id) for w in ws], self.seq_len, self.pad_id)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return sequence_item(self.sequence(i))


def sequence_item(seq: PackedSequence) -> dict[str, Any]:
    """A packed sequence as the dataset item the collators take (tensors + ``trajectory_ids``)."""
    return {
        "tokens": torch.from_numpy(seq.tokens),
        "labels": torch.from_numpy(seq.labels),
        "loss_mask": torch.from_numpy(seq.loss_mask),
        "position_ids": torch.from_numpy(seq.position_ids),
        "cu_seqlens": torch.from_numpy(seq.cu_seqlens),
        "trajectory_ids": seq.trajectory_ids,
    }


def block_causal_mask(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool [1, S, S], True = masked out: causal attention within each ``cu_seqlens`` segment only."""
    doc = torch.bucketize(torch.arange(seq_len), cu_seqlens[1:].long(), right=True)
    same = doc[:, None] == doc[None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return ~(same & causal)[None]


def collate(samples: list[dict[str, Any]], attention: str = "mask") -> dict[str, Any]:
    """Stack items into a batch [B, S].

    ``attention="mask"``: adds ``attention_mask`` bool [B, 1, S, S] (True = masked out).
    ``attention="thd"``: adds ``cu_seqlens`` int32 over the flattened batch and ``max_seqlen``.
    Always: ``padding_mask`` bool [B, S], True on the fill after a row's last window (megatron-core's MoE routing
    leaves those tokens out of its aux loss, z-loss and expert-bias counts); a row without trajectory ids (a
    zero-loss filler row) counts as real, so no micro-batch is padding only.
    """
    out: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask")}
    out["position_ids"] = torch.stack([s["position_ids"] for s in samples])
    out["trajectory_ids"] = [s["trajectory_ids"] for s in samples]
    seq_len = out["tokens"].shape[1]
    ends = [int(s["cu_seqlens"][len(s["trajectory_ids"])]) if s["trajectory_ids"] else seq_len for s in samples]
    out["padding_mask"] = torch.arange(seq_len)[None, :] >= torch.tensor(ends)[:, None]
    if attention == "mask":
        out["attention_mask"] = torch.stack([block_causal_mask(s["cu_seqlens"], seq_len) for s in samples])
    elif attention == "thd":
        cus = [s["cu_seqlens"][1:] + b * seq_len for b, s in enumerate(samples)]
        out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), *cus]).to(torch.int32)
        out["max_seqlen"] = int(torch.diff(out["cu_seqlens"]).max())
    else:
        raise ValueError(f"attention must be 'mask' or 'thd', got {attention!r}")
    return out


class SampleOrder:
    """Global sample order: a permutation of ``range(num_samples)`` per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("SampleOrder needs at least one sample")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle

    def epoch(self, e: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, e]).permutation(self.num_samples)

    def indices(self, start: int = 0) -> Iterator[int]:
        """Infinite stream of sample indices beginning at global position ``start``."""
        e, offset = divmod(start, self.num_samples)
        while True:
            yield from (int(i) for i in self.epoch(e)[offset:])
            e, offset = e + 1, 0


def is_held_out(trajectory_id: str, fraction: float, seed: int) -> bool:
    """Whether a trajectory belongs to the held-out split (a stable hash of ``seed`` and its id)."""
    h = hashlib.sha256(f"{seed}:{trajectory_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def build_windows(
    files: Sequence[str | Path], cfg: DataConfig, renderer: Renderer, *, progress: bool = True
) -> tuple[list[Window], list[Window], SplitStats]:
    """Render and split every trajectory of ``files``; returns (train, valid, stats of both)."""
    policy = ContextPolicy.from_renderer(cfg.policy, renderer)
    stats, read = SplitStats(), ReadStats()
    train: list[Window] = []
    valid: list[Window] = []
    held_out_by_file = bool(cfg.valid_files)
    trajs = read_trajectories(files, skip_invalid=cfg.skip_invalid, stats=read)
    for traj in track(trajs, description="render+split", disable=not progress, transient=True):
        rt = renderer.render(traj)
        windows = split_trajectory(rt, policy)
        stats.add(rt, windows)
        if not held_out_by_file and is_held_out(traj.id, cfg.valid_fraction, cfg.seed):
            valid += windows
        else:
            train += windows
    if read.skipped:
        print(f"skipped {read.skipped} invalid trajectories; first: {read.errors[0]}")
    return train, valid, stats


def build_sft_datasets(cfg: DataConfig, *, progress: bool = True) -> tuple[PackedWindowDataset, PackedWindowDataset]:
    """Train and validation datasets from ``cfg`` (empty ``train_files`` = the bundled demo set)."""
    renderer = Renderer(load_tokenizer(cfg.tokenizer))
    files = cfg.train_files or [str(DEMO_TRAJECTORIES)]
    train, valid, stats = build_windows(files, cfg, renderer, progress=progress)
    if cfg.valid_files:
        valid, _, _ = build_windows(cfg.valid_files, cfg, renderer, progress=progress)
    if not train:
        raise ValueError(f"no training windows from {files}")
    seq_len = cfg.seq_len or cfg.policy.max_len
    return (
        PackedWindowDataset(train, seq_len, renderer.tokenizer, stats),
        PackedWindowDataset(valid, seq_len, renderer.tokenizer),
    )

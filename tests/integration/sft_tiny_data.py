"""A tiny synthetic packed-window dataset with the data pipeline's item shape (test fixture).

Items: tokens/labels/position_ids LongTensor[S], loss_mask FloatTensor[S], cu_seqlens IntTensor[n+1],
trajectory_ids list[str]; ``collate(samples, attention="mask"|"thd")`` and ``TinyOrder`` follow the
``klong_megatron.data.dataset`` contract, so trainer tests do not depend on the demo corpus.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch


class TinyPackedDataset:
    """``n`` sequences of length ``seq_len``, each packing 2 windows of a repeating token pattern."""

    def __init__(self, n: int, seq_len: int, vocab: int = 64, seed: int = 0, poison: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            cut = seq_len // 2 + int(torch.randint(-seq_len // 8, seq_len // 8 + 1, (1,), generator=g))
            base = torch.randint(3, vocab, (8,), generator=g)
            tokens = base.repeat(seq_len // 8 + 2)[: seq_len + 1]
            pos = torch.cat([torch.arange(cut), torch.arange(seq_len - cut)])
            mask = torch.ones(seq_len)
            mask[:4] = 0
            mask[cut : cut + 4] = 0
            mask[cut - 1] = 0  # the last label of a window would predict the next window's first token
            if poison is not None and i == poison:
                mask[seq_len - 2] = float("nan")  # a corrupt sample: its loss is NaN
            self.items.append(
                {
                    "tokens": tokens[:-1].clone(),
                    "labels": tokens[1:].clone(),
                    "loss_mask": mask,
                    "position_ids": pos,
                    "cu_seqlens": torch.tensor([0, cut, seq_len], dtype=torch.int32),
                    "trajectory_ids": [f"traj-{i}-a", f"traj-{i}-b"],
                }
            )
        self.vocab_size = vocab

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(samples: list[dict], attention: str = "mask") -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    out["trajectory_ids"] = [s["trajectory_ids"] for s in samples]
    seq = out["tokens"].shape[1]
    if attention == "mask":
        mask = torch.ones(len(samples), 1, seq, seq, dtype=torch.bool)
        for b, s in enumerate(samples):
            cu = s["cu_seqlens"].tolist()
            for lo, hi in itertools.pairwise(cu):
                mask[b, 0, lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1)
        out["attention_mask"] = mask
    else:
        cus = [s["cu_seqlens"][:-1] + b * seq for b, s in enumerate(samples)]
        out["cu_seqlens"] = torch.cat([*cus, torch.tensor([len(samples) * seq])]).to(torch.int32)
        out["max_seqlen"] = int(max((s["cu_seqlens"][1:] - s["cu_seqlens"][:-1]).max() for s in samples))
    return out


class TinyOrder:
    """Epoch permutations seeded by (seed, epoch), resumable from any global index."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.n, self.seed = num_samples, seed

    def indices(self, start: int = 0) -> Iterator[int]:
        epoch, offset = divmod(start, self.n)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
            yield from perm[offset:]
            epoch, offset = epoch + 1, 0


def tiny_data(n_train: int = 16, n_valid: int = 4, seq_len: int = 64, poison: int | None = None) -> dict:
    return {
        "train": TinyPackedDataset(n_train, seq_len, seed=1, poison=poison),
        "valid": TinyPackedDataset(n_valid, seq_len, seed=2),
        "collate": collate,
        "order": TinyOrder,
    }

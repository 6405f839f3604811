"""Packed training sequences read from a prepared directory (memory-mapped).

Dataflow: ``manifest.json`` (checked against the run's ``DataConfig``) -> ``WindowStore`` (mmap) +
``pack.<split>.{windows,offsets}.npy`` (mmap) -> item ``i`` = ``build_sequence`` over the windows of bin ``i``
-> the same dict as ``PackedWindowDataset[i]`` (bit-identical on the same data and settings; tested).

Start-up reads the manifest and maps the files: its time and resident memory do not grow with the corpus.
An item reads only its own windows' pages, so a data-parallel rank touches only the samples it trains on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from klong_megatron.config.data import DataConfig
from klong_megatron.data.dataset import sequence_item
from klong_megatron.data.pack import PackedSequence, build_sequence
from klong_megatron.data.render import load_tokenizer
from klong_megatron.prepared.manifest import Manifest, check_manifest
from klong_megatron.prepared.prepare import STORE
from klong_megatron.prepared.store import StoreError, WindowStore


class PreparedPackedDataset(torch.utils.data.Dataset):
    """The packed sequences of one split of a prepared directory; item ``i`` as in ``PackedWindowDataset``."""

    def __init__(
        self, store: WindowStore, directory: Path, split: str, seq_len: int, tokenizer: Any, efficiency: float
    ):
        self.store, self.seq_len, self.tokenizer = store, seq_len, tokenizer
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.windows = _load(directory / f"pack.{split}.windows.npy")
        """int64 [windows]: store window ids, bin by bin"""
        self.offsets = _load(directory / f"pack.{split}.offsets.npy")
        """int64 [sequences + 1]: bin ``i`` is ``windows[offsets[i]:offsets[i+1]]``"""
        if len(self.offsets) == 0 or int(self.offsets[-1]) != len(self.windows):
            raise StoreError(f"{directory}/pack.{split}.*: offsets and windows disagree (corrupt pack plan)")
        self.efficiency = efficiency

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def bin(self, i: int) -> np.ndarray:
        return self.windows[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def sequence(self, i: int) -> PackedSequence:
        s = self.store
        return build_sequence(
            [(s.tokens(k), s.loss_mask(k), s.trajectory_id(k)) for k in self.bin(i)], self.seq_len, self.pad_id
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        return sequence_item(self.sequence(i))


def _load(path: Path) -> np.ndarray:
    if not path.exists():
        raise StoreError(f"{path}: missing from the prepared data (rerun klong-data prepare)")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as e:
        raise StoreError(f"{path}: not a readable array ({e})") from e


def open_prepared(
    directory: str | Path, cfg: DataConfig, where: str = "data.prepared"
) -> tuple[PreparedPackedDataset, PreparedPackedDataset, Manifest]:
    """Train and held-out datasets of a prepared ``directory`` after checking its manifest against ``cfg``."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    check_manifest(manifest, cfg, f"{where}={str(directory)!r}")
    store = WindowStore(directory / STORE, sizes=manifest.files)
    tok = load_tokenizer(cfg.tokenizer)
    train, valid = (
        PreparedPackedDataset(store, directory, split, manifest.seq_len, tok, manifest.pack[split]["efficiency"])
        for split in ("train", "valid")
    )
    return train, valid, manifest

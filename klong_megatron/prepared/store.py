"""Windows on disk: megatron-core indexed datasets (``.bin`` + ``.idx``), one per window field.

A store with prefix ``P`` (one per input shard while preparing, one merged store for training):

    P.tokens.{bin,idx}     int32  one sequence per window, one document per trajectory
    P.loss_mask.{bin,idx}  uint8  the same sequence lengths
    P.positions.{bin,idx}  int32  index of each token in the trajectory's full rendering, -1 for markers
    P.segments.{bin,idx}   int32  4 ints per segment: message index, kind (prefix/marker/carried/new), start, end
    P.windows.npy          int64 [n, 5]  trajectory row, window index, prefix_len, elided, held out (0/1)
    P.trajectories.npy     bytes [t]     trajectory ids (utf-8), row = the trajectory row above

The four token-aligned fields are written with megatron-core's own ``IndexedDatasetBuilder`` and read with
its ``IndexedDataset`` (memory-mapped; megatron-core 0.16.1 ``megatron/core/datasets/indexed_dataset.py``).
Why four datasets and not one multimodal dataset (a mode per sequence): an indexed dataset has one dtype,
so a multimodal store would spend int32 on each loss-mask byte (9 -> 12 bytes per window token). The
per-window scalars and the ids are fixed-width arrays in ``.npy`` files, memory-mapped the same way.

Reading touches only the pages of the windows asked for: opening a store costs the same at any size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset, IndexedDatasetBuilder, _IndexReader

from klong_megatron.data.context import CARRIED, MARKER, NEW, PREFIX, Window
from klong_megatron.errors import UserError

FIELDS: dict[str, type[np.number]] = {
    "tokens": np.int32,
    "loss_mask": np.uint8,
    "positions": np.int32,
    "segments": np.int32,
}
KINDS = (PREFIX, MARKER, CARRIED, NEW)
ROW = ("trajectory", "window_index", "prefix_len", "elided", "held_out")
"""Columns of ``P.windows.npy``."""


class StoreError(UserError):
    """A prepared store that is missing, truncated or corrupt; the message names the file."""


def store_files(prefix: str | Path) -> list[Path]:
    """Every file of the store at ``prefix``."""
    p = str(prefix)
    return [Path(f"{p}.{f}.{ext}") for f in FIELDS for ext in ("bin", "idx")] + [
        Path(f"{p}.windows.npy"),
        Path(f"{p}.trajectories.npy"),
    ]


class StoreWriter:
    """Appends trajectories' windows to a new store at ``prefix`` (files are complete after ``finalize``)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self._builders = {f: IndexedDatasetBuilder(f"{self.prefix}.{f}.bin", dtype=dt) for f, dt in FIELDS.items()}
        self._rows: list[np.ndarray] = []
        self._ids: list[bytes] = []

    def add_trajectory(self, trajectory_id: str, windows: list[Window], held_out: bool) -> None:
        """One document: the windows of one trajectory, in order (a trajectory without windows is not stored)."""
        if not windows:
            return
        row = len(self._ids)
        self._ids.append(trajectory_id.encode())
        lengths = [len(w) for w in windows]
        self._builders["tokens"].add_document(np.concatenate([w.input_ids for w in windows]), lengths)
        self._builders["loss_mask"].add_document(np.concatenate([w.loss_mask for w in windows]), lengths)
        self._builders["positions"].add_document(np.concatenate([w.positions for w in windows]), lengths)
        segs = [
            np.asarray([(m, KINDS.index(k), s, e) for m, k, s, e in w.segments], np.int32).reshape(-1) for w in windows
        ]
        self._builders["segments"].add_document(np.concatenate(segs), [len(s) for s in segs])
        rows = [(row, w.window_index, w.prefix_len, w.elided, int(held_out)) for w in windows]
        self._rows.append(np.asarray(rows, np.int64))

    def add_store(self, prefix: str | Path) -> None:
        """Append a whole finished store; its bytes are copied once.

        Does what megatron-core's ``IndexedDatasetBuilder.add_index`` does (same reader, same lists) without
        its ``gc.collect()`` per call, which cost ~0.5 s of CPU each with torch loaded (4 per shard).
        """
        for f, b in self._builders.items():
            index = _IndexReader(f"{prefix}.{f}.idx", multimodal=False)
            assert index.dtype == b.dtype, (index.dtype, b.dtype)
            offset = len(b.sequence_lengths)
            b.sequence_lengths.extend(index.sequence_lengths.tolist())
            b.document_indices.extend((offset + index.document_indices[1:]).tolist())
            del index
            with open(f"{prefix}.{f}.bin", "rb") as src:
                shutil.copyfileobj(src, b.data_file)
        rows = np.load(f"{prefix}.windows.npy").copy()
        rows[:, 0] += len(self._ids)
        self._rows.append(rows)
        self._ids += list(np.load(f"{prefix}.trajectories.npy"))

    def finalize(self) -> None:
        for f, b in self._builders.items():
            b.finalize(f"{self.prefix}.{f}.idx")
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, len(ROW)), np.int64)
        np.save(f"{self.prefix}.windows.npy", rows)
        width = max([len(i) for i in self._ids] + [1])
        np.save(f"{self.prefix}.trajectories.npy", np.asarray(self._ids, dtype=f"S{width}"))


def _open_indexed(path: str) -> IndexedDataset:
    with open(f"{path}.idx", "rb") as f:  # checked first: megatron-core's reader asserts, then fails in __del__
        if f.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise StoreError(f"{path}.idx: not a readable indexed dataset (no megatron-core index header)")
    try:
        return IndexedDataset(path, mmap=True)
    except (AssertionError, ValueError) as e:  # megatron-core asserts on a bad header / truncated index
        raise StoreError(f"{path}.idx: not a readable indexed dataset ({e or 'inconsistent index'})") from e


class WindowStore:
    """Read side of a store: window ``i``'s fields as (memory-mapped, read-only) numpy arrays."""

    def __init__(self, prefix: str | Path, sizes: dict[str, int] | None = None):
        """``sizes`` (file name -> bytes, from the manifest): a shorter or longer file is a clear error."""
        self.prefix = str(prefix)
        for path in store_files(self.prefix):
            if not path.exists():
                raise StoreError(f"{path}: missing from the prepared data (rerun klong-data prepare)")
            if sizes is not None and os.path.getsize(path) != sizes.get(path.name):
                raise StoreError(
                    f"{path}: {os.path.getsize(path)} bytes, the manifest says {sizes.get(path.name)} "
                    "(truncated or rewritten; rerun klong-data prepare)"
                )
        self._fields = {f: _open_indexed(f"{self.prefix}.{f}") for f in FIELDS}
        self.rows = np.load(f"{self.prefix}.windows.npy", mmap_mode="r")
        self.ids = np.load(f"{self.prefix}.trajectories.npy", mmap_mode="r")
        n = len(self._fields["tokens"])
        if any(len(d) != n for d in self._fields.values()) or len(self.rows) != n:
            raise StoreError(f"{self.prefix}.*: fields disagree on the number of windows (corrupt store)")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """int32 [n]: tokens per window (memory-mapped)."""
        return self._fields["tokens"].sequence_lengths

    def tokens(self, i: int) -> np.ndarray:
        return self._fields["tokens"][int(i)]

    def loss_mask(self, i: int) -> np.ndarray:
        return self._fields["loss_mask"][int(i)]

    def trajectory_id(self, i: int) -> str:
        return self.ids[int(self.rows[int(i), 0])].decode()

    def window(self, i: int) -> Window:
        """Window ``i`` with its full provenance (as ``split_trajectory`` made it)."""
        traj, index, prefix_len, elided, _ = (int(v) for v in self.rows[int(i)])
        segs = self._fields["segments"][int(i)].reshape(-1, 4).tolist()
        return Window(
            trajectory_id=self.ids[traj].decode(),
            window_index=index,
            input_ids=np.array(self.tokens(i)),
            loss_mask=np.array(self.loss_mask(i)),
            positions=np.array(self._fields["positions"][int(i)], np.int64),
            prefix_len=prefix_len,
            segments=[(m, KINDS[k], s, e) for m, k, s, e in segs],
            elided=elided,
        )

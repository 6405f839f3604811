"""Safetensors files read and written one tensor at a time, with plain file reads and writes (no mmap).

    hf = SafetensorsDir(hf_dir)        # {name: tensor} over all *.safetensors files; a lookup reads one tensor
    f = SafetensorsWriter(path, [(name, shape, dtype), ...])   # header first, then f.write(name, t) in order

The format (safetensors' own spec): 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to 8
bytes, then the raw little-endian tensor bytes. Reading through ``readinto`` instead of the library's mmap keeps
a conversion's resident memory at the tensors it holds: pages of an mmapped 100 GB checkpoint count as the
process's RSS (and against a job's memory limit) until the kernel drops them. Files written here are read by
``safetensors`` / transformers (tested).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fmt: skip
_CODES = {v: k for k, v in _DTYPES.items()}


def _bytes(t: torch.Tensor):
    """A writable byte view of contiguous ``t`` (any dtype, bf16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class SafetensorsDir(Mapping[str, torch.Tensor]):
    """The tensors of a folder's ``*.safetensors`` files; each lookup reads that tensor from disk (headers only
    are read up front). FileNotFoundError when there are none; ValueError naming a file that is cut short."""

    def __init__(self, hf_dir: str | Path) -> None:
        files = sorted(Path(hf_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            self._where.update({k: (f, 8 + n, v) for k, v in header.items()})

    def __getitem__(self, name: str) -> torch.Tensor:
        f, base, meta = self._where[name]
        begin, end = meta["data_offsets"]
        t = torch.empty(meta["shape"], dtype=_DTYPES[meta["dtype"]])
        with f.open("rb") as fh:
            fh.seek(base + begin)
            got = fh.readinto(_bytes(t)) if t.numel() else 0
        if got != end - begin:
            raise ValueError(f"{f}: {name} is cut short ({got} of {end - begin} bytes)")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class SafetensorsWriter:
    """A safetensors file written front to back: the header from the planned ``entries`` (name, shape, dtype),
    then :meth:`write` in the same order; the file is closed after the last entry."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            n = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.pending = list(reversed(entries))

    def write(self, name: str, t: torch.Tensor) -> None:
        expected = self.pending.pop()
        assert expected == (name, tuple(t.shape), t.dtype), (expected, name, t.shape, t.dtype)
        self.file.write(_bytes(t.contiguous()))
        if not self.pending:
            self.file.close()

"""Crash-safe trajectory store: one JSONL file, append + fsync, resumable.

Dataflow: a finished rollout -> ``append(record)`` (one line, flushed and fsynced before it
returns) -> the file is the data pipeline's trajectory JSONL. On open, a torn last line (the
process died while writing it) is cut off, and the ids of the complete lines are loaded, so a
restarted manager skips finished rollouts and never writes one twice.

Limits: one writer per file (the manager or the rollout service); ids of every stored record are kept in
memory. Readers in other processes use ``read_at`` with the offsets ``append`` returned.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class TrajectoryStore:
    """Append-only JSONL of trajectory records (``{"id", "messages", "meta"}``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.repaired_bytes = self._repair()
        self.ids: set[str] = set()
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    self.ids.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{self.path}:{lineno}: not a trajectory record ({e})") from None

    def _repair(self) -> int:
        """Cut an incomplete last line; returns how many bytes were dropped."""
        if not self.path.exists():
            self.path.touch()
            return 0
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    pos = pos - step + nl + 1
                    break
                pos -= step
            if pos < size:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
            return size - pos

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, record: dict[str, Any]) -> int:
        """Durably append one record; returns its line's byte offset (for ``read_at``). A record whose id
        is already stored raises ValueError."""
        rid = str(record["id"])
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if rid in self.ids:
                raise ValueError(f"{self.path}: trajectory {rid!r} is already stored")
            with open(self.path, "ab") as f:
                offset = f.seek(0, os.SEEK_END)
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.ids.add(rid)
        return offset


def read_at(path: str | Path, offsets: list[int]) -> list[dict[str, Any]]:
    """The records whose lines start at ``offsets`` in the JSONL file ``path`` (as ``append`` returned
    them): a reader (another process, too) gets exactly those records without scanning the file."""
    out = []
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            line = f.readline()
            if not line.endswith(b"\n"):
                raise ValueError(f"{path}: no complete record at byte {off}")
            out.append(json.loads(line))
    return out

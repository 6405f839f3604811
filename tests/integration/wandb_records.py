"""Read an offline W&B run file (``run-<id>.wandb``): its run id and the steps of its history records.

The file is a LevelDB-style log (W&B's ``datastore``): a 7-byte header, then 32 KiB blocks of records
framed as crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last), each a protobuf
``wandb.proto.wandb_internal_pb2.Record``. wandb 0.31 no longer ships a Python reader, so tests use this.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

HEADER, BLOCK, FRAME = 7, 32768, 7


def _payloads(data: bytes) -> Iterator[bytes]:
    pos, buf = HEADER, b""
    while pos + FRAME <= len(data):
        if BLOCK - pos % BLOCK < FRAME:  # block trailer too small for a frame: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + FRAME])
        chunk, pos = data[pos + FRAME : pos + FRAME + n], pos + FRAME + n
        if kind == 0:
            return
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            yield buf


def read_run(run_dir: Path, wait_for_step: int | None = None, timeout_s: float = 60) -> tuple[str, list[int]]:
    """(run id, history steps) of the offline run in ``run_dir``; waits until ``wait_for_step`` is flushed."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout_s
    while True:
        run_id, steps = "", []
        for path in run_dir.glob("*.wandb"):
            for payload in _payloads(path.read_bytes()):
                rec = pb.Record()
                rec.ParseFromString(payload)
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    run_id = rec.run.run_id
                elif kind == "history":
                    steps.append(rec.history.step.num)
        if wait_for_step is None or wait_for_step in steps or time.monotonic() > deadline:
            return run_id, steps
        time.sleep(0.5)

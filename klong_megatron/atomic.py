"""Atomic file outputs: a command that stops half-way leaves no partial file behind.

    with atomic_output(path) as tmp:      # write tmp; renamed onto path only when the block succeeds
        tmp.write_text(...)

Pure module (standard library only). The rename is atomic on POSIX file systems (same directory).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.
    A missing parent directory is a ``FileNotFoundError`` naming it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(2, "No such file or directory", str(path.parent))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Pieces shared by the sandbox backends: bounded output capture, run labels, path checks."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n[... {dropped} bytes of output omitted ...]\n"

# Shell wrapper run as the command's parent inside the sandbox: once the command returns, every other
# process of the sandbox (background jobs, setsid escapees) is killed, so nothing outlives the call and
# no stray process keeps the output pipe open. kill(-1) spares only the sandbox's init and the caller;
# three rounds catch children forked while the first signal was being delivered.
REAP_WRAPPER = '/bin/sh -c "$1"; rc=$?; for _ in 1 2 3; do kill -KILL -1 2>/dev/null; done; exit $rc'


class SandboxError(RuntimeError):
    """A sandbox could not be started or used (the message names the sandbox and the cause)."""


class OutputCapture:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts what falls in between."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit - limit // 2
        self.tail_limit = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_limit:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        """Decoded output (invalid UTF-8 replaced), with a marker where bytes were dropped."""
        if not self.truncated:
            return bytes(self.head + self.tail).decode("utf-8", errors="replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return (
            bytes(self.head).decode("utf-8", errors="replace")
            + TRUNCATION_MARKER.format(dropped=dropped)
            + bytes(self.tail).decode("utf-8", errors="replace")
        )


def default_run_id() -> str:
    """Host name + process id: distinct per training process, stable within it."""
    return f"{socket.gethostname()}-{os.getpid()}"


def new_sandbox_name(run_id: str) -> str:
    return f"klong-sbx-{run_id}-{uuid.uuid4().hex[:8]}".replace("_", "-").lower()


_DIR_RE = re.compile(r"^klong-sbx-(\d+)-")


def host_dir_prefix() -> str:
    """Name prefix of this process's host directories (work dirs, egress dirs): the reaper reads the pid."""
    return f"klong-sbx-{os.getpid()}-"


def reap_dead_dirs(host_dir: str | None = None) -> list[str]:
    """Remove ``klong-sbx-<pid>-*`` directories under ``host_dir`` (None: temp dir) whose pid is dead."""
    removed = []
    for d in Path(host_dir or tempfile.gettempdir()).glob("klong-sbx-*"):
        m = _DIR_RE.match(d.name)
        if m and d.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    if removed:
        log.info("reaped %d leftover sandbox dir(s) of dead processes", len(removed))
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sandbox_path(workdir: str, path: str) -> str:
    """Absolute path inside the sandbox: relative paths are taken from the work directory."""
    if not path:
        raise ValueError("path must not be empty")
    if "\0" in path:
        raise ValueError(f"path contains a NUL byte: {path!r}")
    return os.path.normpath(path if path.startswith("/") else os.path.join(workdir, path))


def writable_path(workdir: str, path: str) -> str:
    """``sandbox_path`` for writes, which the contract allows only under the work directory."""
    target = sandbox_path(workdir, path)
    root = workdir.rstrip("/")
    if not target.startswith(root + "/"):
        raise PermissionError(f"write_file writes only under {root}; got {path!r}")
    return target

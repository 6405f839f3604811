"""Pieces shared by the sandbox backends: bounded output capture, run labels, path checks."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from klong_megatron.config.sandbox import SandboxConfig

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
    """Remove ``klong-sbx-<pid>-*`` directories (work disks unmounted first) and disk images under
    ``host_dir`` (None: temp dir) whose pid is dead."""
    removed = []
    for d in Path(host_dir or tempfile.gettempdir()).glob("klong-sbx-*"):
        m = _DIR_RE.match(d.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        if d.is_dir():
            unmount_and_remove(d)
            removed.append(str(d))
        elif d.name.endswith(".img"):
            d.unlink(missing_ok=True)
    if removed:
        log.info("reaped %d leftover sandbox dir(s) of dead processes", len(removed))
    return removed


def unmount_and_remove(mount_dir: Path) -> None:
    """Unmount ``mount_dir`` if it is a mount point (lazily when busy), then delete it and its disk image."""
    if os.path.ismount(mount_dir):
        if subprocess.run(["umount", str(mount_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_dir)], capture_output=True)
    if not os.path.ismount(mount_dir):
        shutil.rmtree(mount_dir, ignore_errors=True)
    mount_dir.with_name(mount_dir.name + ".img").unlink(missing_ok=True)


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


def check_ro_binds(cfg: SandboxConfig) -> None:
    """Commands run as an unprivileged uid: each ``ro_binds`` host path must be readable by others and its
    parents searchable, else the sandbox would silently see nothing. Raises SandboxError naming the path."""
    if cfg.run_as_root:
        return
    for i, spec in enumerate(cfg.ro_binds):
        host = Path(spec.partition(":")[0])
        if not host.exists():
            raise SandboxError(f"ro_binds[{i}]: {host} does not exist")
        for part in (host, *host.parents):
            need = (0o005 if part.is_dir() else 0o004) if part == host else 0o001
            if part.stat().st_mode & need != need:
                raise SandboxError(
                    f"ro_binds[{i}]: {part} is not {'readable' if part == host else 'searchable'} by the sandbox's "
                    f"unprivileged uid (mode {oct(part.stat().st_mode & 0o777)}); chmod o+rX it (o+x its parents)"
                )

"""Size-limited work directories: a sparse ext4 image, loop-mounted on the host, one per sandbox.

Dataflow: ``WorkDisk.create()`` makes ``<host_dir>/klong-sbx-<pid>-XXXX.img`` (sparse, ``size_mb``), formats
it (``mkfs.ext4``, no journal, no reserved blocks, root directory owned by the sandbox's uid:gid) and
mounts it (``loop,nosuid,nodev``) on ``<host_dir>/klong-sbx-<pid>-XXXX``, which the backend binds at the
sandbox's work dir. ``remove()`` unmounts (lazily if a container still holds it) and deletes both.

What it enforces: the work dir holds at most ``size_mb`` of data and one inode (file, directory, link)
per 16 KiB of it (``mkfs.ext4 -i 16384``); a write beyond either fails inside the sandbox with ENOSPC
("No space left on device"), and the host file system grows by at most ``size_mb`` (the image is
sparse). ``nosuid`` means a setuid file in the work dir grants nothing. Limits: needs root on the host
(mount) and ``mkfs.ext4``; Docker needs a local engine (the mount point is bind-mounted). The reaper
(_common.reap_dead_dirs) unmounts and removes disks whose creating process died.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from klong_megatron.sandbox._common import SandboxError, host_dir_prefix, unmount_and_remove


def disk_support_problem() -> str | None:
    """Why ``WorkDisk`` cannot work on this host (None when it can)."""
    if os.geteuid() != 0:
        return f"loop-mounting the work dir image needs root on the host (running as uid {os.geteuid()})"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install e2fsprogs mount)"
    if not Path("/dev/loop-control").exists():
        return "the host has no loop devices (/dev/loop-control is missing)"
    return None


class WorkDisk:
    """One sandbox's size-limited work directory (see the module docstring)."""

    def __init__(self, size_mb: int, host_dir: str | None, uid: int, gid: int) -> None:
        self.size_mb, self.host_dir, self.uid, self.gid = size_mb, host_dir, uid, gid
        self.mount_dir: Path | None = None
        self.image: Path | None = None

    def create(self) -> Path:
        """Make, format and mount the image; returns the mount point (owned by uid:gid)."""
        problem = disk_support_problem()
        if problem:
            raise SandboxError(
                f"workdir_mb={self.size_mb}: {problem}; set sandbox.workdir_mb=null to run without a work dir limit"
            )
        self.mount_dir = Path(tempfile.mkdtemp(prefix=host_dir_prefix(), dir=self.host_dir))
        self.image = self.mount_dir.with_name(self.mount_dir.name + ".img")
        try:
            with open(self.image, "wb") as f:
                f.truncate(self.size_mb * 1024 * 1024)
            owner = f"root_owner={self.uid}:{self.gid}"
            _run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-i", "16384", "-O", "^has_journal", "-E", owner, str(self.image)]
            )
            _run(["mount", "-o", "loop,nosuid,nodev", str(self.image), str(self.mount_dir)])
            os.chmod(self.mount_dir, 0o755)
            (self.mount_dir / "lost+found").rmdir()  # an empty work dir, as without a disk (never fsck'd)
        except SandboxError:
            self.remove()
            raise
        return self.mount_dir

    def remove(self) -> None:
        """Unmount and delete the image and mount point (idempotent)."""
        if self.mount_dir is not None:
            unmount_and_remove(self.mount_dir)
            self.mount_dir = None
        if self.image is not None:
            self.image.unlink(missing_ok=True)
            self.image = None


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise SandboxError(f"work dir disk: `{' '.join(argv)}` failed: {(p.stderr or p.stdout).strip()}")

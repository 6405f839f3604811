"""bubblewrap sandbox: no daemon; every command is one ``bwrap`` process in fresh namespaces.

Dataflow: start() makes a host work directory. exec() runs
``[setpriv to the sandbox uid] prlimit <limits> bwrap --unshare-all --die-with-parent ... sh -c cmd``
with the host's /usr (and a few /etc files) bound read-only, private /proc, /dev and /tmp, the work
directory bound at ``cfg.workdir`` and the root remounted read-only. When the command returns, bwrap's
PID-namespace init exits and the kernel kills whatever it left (setsid escapees included); on timeout
the bwrap process group is killed and ``--die-with-parent`` takes the namespace down with it; close()
does the same to commands still running in other threads (their exec raises ``SandboxError``).
``network=allowlist``: the command runs as the child of the egress forwarder (egress.py, forwarder.py;
host python3, ~35 ms more per command), which relays 127.0.0.1:3128 to the allow-list proxy's socket.

Least privilege: the command runs as ``uid:gid`` inside a user namespace (``--disable-userns``: no nested
ones), with no capabilities and no-new-privileges (bwrap's defaults), and a seccomp filter (seccomp.py)
that refuses ptrace (PID 1, bwrap's init, runs under the same uid). The work dir is a size-limited disk
(disk.py, ``workdir_mb``; needs root) or, with ``workdir_mb=None``, a plain host directory.

Limits (say them plainly): memory is an address-space rlimit (an allocation fails inside the program,
e.g. ``MemoryError``; no OOM killer); CPU is a CPU-seconds rlimit (``cpus`` is not enforced); the
process limit is an nproc rlimit, which only binds a non-root uid, so when run as root each sandbox
drops to its own uid (setpriv) and without root ``pids`` is not enforced. /tmp lives only as long as
one command. The host's /usr is the sandbox's system (``image`` is ignored).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox._common import (
    OutputCapture,
    SandboxError,
    check_ro_binds,
    default_run_id,
    host_dir_prefix,
    reap_dead_dirs,
    sandbox_path,
    writable_path,
)
from klong_megatron.sandbox.base import ExecResult
from klong_megatron.sandbox.disk import WorkDisk
from klong_megatron.sandbox.egress import NET_DIR, EgressProxy, forwarder_argv, proxy_env
from klong_megatron.sandbox.seccomp import filter_fd

log = logging.getLogger(__name__)

SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/mime.types",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UID_BASE = 200_000
_uids = itertools.count()
_live: dict[int, BwrapSandbox] = {}


@atexit.register
def _close_all_at_exit() -> None:
    for sb in list(_live.values()):
        sb.close()


def reap_leftovers(host_dir: str | None = None) -> list[str]:
    """Remove work (and egress) directories left by dead processes; returns their paths."""
    return reap_dead_dirs(host_dir)


class BwrapSandbox:
    """A host work directory plus the recipe for the bwrap command line; see the module docstring."""

    def __init__(self, cfg: SandboxConfig) -> None:
        self.cfg = cfg
        self.run_id = cfg.run_id or default_run_id()
        self.host_work: Path | None = None
        self.uid: int | None = None
        self.name = ""
        self.egress: EgressProxy | None = None
        """network=allowlist: the proxy (``egress.refusals`` lists what was refused)."""
        self._procs: set[subprocess.Popen] = set()
        self._disk: WorkDisk | None = None
        self._procs_changed = threading.Condition()

    def start(self) -> None:
        if self.host_work is not None:
            return
        if shutil.which("bwrap") is None:
            raise SandboxError("bubblewrap (bwrap) is not installed; apt-get install bubblewrap")
        reap_leftovers(self.cfg.host_dir)
        if os.geteuid() == 0:
            self.uid = UID_BASE + (os.getpid() * 97 + next(_uids)) % 100_000
            check_ro_binds(self.cfg)
        owner = os.geteuid() if self.uid is None else self.uid
        if self.cfg.workdir_mb is not None:
            self._disk = WorkDisk(self.cfg.workdir_mb, self.cfg.host_dir, owner, owner)
            self.host_work = self._disk.create()
        else:
            self.host_work = Path(tempfile.mkdtemp(prefix=host_dir_prefix(), dir=self.cfg.host_dir))
            os.chown(self.host_work, owner, owner)
        self.name = self.host_work.name
        _live[id(self)] = self
        if self.cfg.network == "allowlist":
            if shutil.which("python3") is None:
                self.close()
                raise SandboxError("network=allowlist needs python3 on the host (it runs the in-sandbox forwarder)")
            self.egress = EgressProxy(self.cfg.allow_rules, f"{self.host_work}-net", self.name)
            try:
                self.egress.start()
            except SandboxError:
                self.close()
                raise

    def close(self) -> None:
        """Kill commands still running (from other threads), then remove the work directory (idempotent)."""
        _live.pop(id(self), None)
        with self._procs_changed:
            host_work, self.host_work = self.host_work, None
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # bwrap dies; --die-with-parent ends its namespace
            if not self._procs_changed.wait_for(lambda: not self._procs, timeout=10):
                log.warning("sandbox %s: %d command(s) did not end after SIGKILL", self.name, len(self._procs))
        if self.egress is not None:
            self.egress.close()
            self.egress = None
        if self._disk is not None:
            self._disk.remove()
            self._disk = None
        elif host_work is not None:
            shutil.rmtree(host_work, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- command line -----------------------------------------------------------------------------
    def _argv(self, inner: list[str], cwd: str, env: dict[str, str] | None, seccomp: int | None) -> list[str]:
        if self.host_work is None:
            raise SandboxError("bwrap sandbox is not started")
        cfg = self.cfg
        prefix: list[str] = []
        limits = [f"--as={cfg.memory_mb * 1024 * 1024}", f"--fsize={cfg.max_file_mb * 1024 * 1024}"]
        limits.append(f"--nofile={cfg.nofile}")
        if cfg.cpu_time_s:
            limits.append(f"--cpu={cfg.cpu_time_s}")
        if self.uid is not None:
            prefix = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]
            limits.append(f"--nproc={cfg.pids}")
        inside = "0" if cfg.run_as_root else None
        args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
        args += ["--hostname", "sandbox", "--uid", inside or str(cfg.uid), "--gid", inside or str(cfg.gid)]
        if seccomp is not None:
            args += ["--seccomp", str(seccomp)]
        if cfg.network == "host":
            args.append("--share-net")
        if self.egress is not None:
            args += ["--ro-bind", str(self.egress.net_dir), NET_DIR]
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                args += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                args += ["--ro-bind", d, d]
        for f in ETC_FILES:
            if os.path.exists(f):
                args += ["--ro-bind", f, f]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(cfg.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
        args += ["--bind", str(self.host_work), cfg.workdir]
        for spec in cfg.ro_binds:
            host, _, inside = spec.partition(":")
            args += ["--ro-bind", host, inside]
        if cfg.read_only_root:
            args += ["--remount-ro", "/"]
        args += ["--chdir", cwd, "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/tmp"]
        net_env = proxy_env(cfg.pip_index_url) if self.egress is not None else {}
        for k, v in {**net_env, **cfg.env, **(env or {})}.items():
            args += ["--setenv", k, v]
        return [*prefix, "prlimit", *limits, "--", *args, "--", *inner]

    # -- commands ---------------------------------------------------------------------------------
    def exec(
        self, cmd: str, *, timeout: float, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> ExecResult:
        inner = ["/bin/sh", "-c", cmd]
        if self.egress is not None:  # the forwarder listens first, then runs the command as its child
            inner = forwarder_argv("--", *inner)
        t0 = time.monotonic()
        out, err = OutputCapture(self.cfg.max_output_bytes), OutputCapture(self.cfg.max_output_bytes)
        with self._procs_changed, _seccomp_fd() as fd:
            if self.host_work is None:
                raise SandboxError(f"sandbox {self.name} is closed")
            argv = self._argv(inner, sandbox_path(self.cfg.workdir, cwd or self.cfg.workdir), env, fd)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=() if fd is None else (fd,),
            )
            self._procs.add(proc)
        try:
            return self._collect(proc, t0, timeout, out, err)
        finally:
            with self._procs_changed:
                self._procs.discard(proc)
                self._procs_changed.notify_all()

    def _collect(
        self, proc: subprocess.Popen, t0: float, timeout: float, out: OutputCapture, err: OutputCapture
    ) -> ExecResult:
        finished = _pump_pipes(proc, t0 + timeout, out, err)
        if not finished:
            log.warning("sandbox %s: command timed out after %.1fs; killing it", self.name, timeout)
            os.killpg(proc.pid, signal.SIGKILL)
            _pump_pipes(proc, time.monotonic() + 2.0, out, err)
        for f in (proc.stdout, proc.stderr):
            assert f is not None
            f.close()
        code = proc.wait()
        duration = time.monotonic() - t0
        if self.host_work is None:
            raise SandboxError(f"sandbox {self.name} was closed while a command ran ({duration:.1f}s); it was killed")
        if not finished:
            return ExecResult(None, out.text(), err.text(), True, duration, out.truncated or err.truncated)
        if code != 0 and bytes(err.head).startswith(b"bwrap: "):  # bwrap's own setup error, not the command's
            raise SandboxError(f"sandbox {self.name}: bwrap failed: {err.text().strip()}")
        return ExecResult(code, out.text(), err.text(), False, duration, out.truncated or err.truncated)

    def _run_raw(self, inner: list[str], stdin: bytes | None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        try:
            with _seccomp_fd() as fd:
                argv = self._argv(inner, self.cfg.workdir, None, fd)
                fds = () if fd is None else (fd,)
                p = subprocess.run(
                    argv, input=stdin or b"", capture_output=True, timeout=timeout, start_new_session=True, pass_fds=fds
                )
        except subprocess.TimeoutExpired as e:
            raise SandboxError(f"sandbox {self.name}: file operation timed out after {timeout}s") from e
        if p.returncode != 0 and p.stderr.startswith(b"bwrap: "):
            raise SandboxError(f"sandbox {self.name}: bwrap failed: {p.stderr.decode(errors='replace').strip()}")
        return p.returncode, p.stdout, p.stderr

    # -- files ------------------------------------------------------------------------------------
    def write_file(self, path: str, data: bytes | str) -> None:
        target = writable_path(self.cfg.workdir, path)
        payload = data.encode() if isinstance(data, str) else data
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
        code, _, err = self._run_raw(["/bin/sh", "-c", script, "sh", target], payload)
        if code != 0:
            raise OSError(f"sandbox {self.name}: cannot write {target}: {err.decode(errors='replace').strip()}")

    def read_file(self, path: str) -> bytes:
        target = sandbox_path(self.cfg.workdir, path)
        script = 'if [ -d "$1" ]; then echo "is a directory" >&2; exit 21; fi; exec cat -- "$1"'
        code, out, err = self._run_raw(["/bin/sh", "-c", script, "sh", target], None)
        if code == 21:
            raise IsADirectoryError(f"sandbox {self.name}: not a regular file: {target}")
        if code != 0:
            msg = err.decode(errors="replace").strip()
            exc = FileNotFoundError if "No such file" in msg else OSError
            raise exc(f"sandbox {self.name}: cannot read {target}: {msg}")
        return out

    def export(self, dest: str | Path) -> Path:
        """Copy the work directory's contents into ``dest`` (created); symlinks stay links."""
        if self.host_work is None:
            raise SandboxError("bwrap sandbox is not started")
        dest = Path(dest)
        shutil.copytree(self.host_work, dest, symlinks=True, dirs_exist_ok=True)
        return dest


@contextlib.contextmanager
def _seccomp_fd() -> Iterator[int | None]:
    """The seccomp program's pipe for one bwrap start (closed here once bwrap has been spawned)."""
    fd = filter_fd()
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _pump_pipes(proc: subprocess.Popen, deadline: float, out: OutputCapture, err: OutputCapture) -> bool:
    """Read stdout/stderr into the captures until both close; False when the deadline passed first."""
    sel = selectors.DefaultSelector()
    for f, cap in ((proc.stdout, out), (proc.stderr, err)):
        if f is not None and not f.closed:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ, cap)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _ in sel.select(min(left, 1.0)):
                chunk = os.read(key.fd, 1 << 20)
                if chunk:
                    key.data.feed(chunk)
                else:
                    sel.unregister(key.fileobj)
        return True
    finally:
        sel.close()

"""Docker sandbox: one long-lived container per sandbox, commands run with ``docker exec``.

Dataflow: start() creates a labelled container (no network, memory/CPU/pids limits, read-only root,
tmpfs /tmp, the work dir) whose init is a tiny shell loop that reaps orphans. exec() streams the
command's multiplexed output over the engine socket into bounded captures until it ends or the
deadline passes. Every command runs under ``REAP_WRAPPER``, so background jobs die when it returns.
On timeout every process but init is killed from a fresh exec; when even that cannot run (pids
exhausted, or it does not finish within ``KILL_PROBE_S``) the container itself is killed and started
again in the background: files in the work dir survive, /tmp does not. A container found dead is restarted once
and the call retried (logged). Containers carry labels (run id, host, pid): the first start in a
process removes those whose creating process is gone (``reap_leftovers``), and an exit hook removes
this process's own; ``docker ps -f label=klong.run=<run_id>`` lists a run's sandboxes.

Least privilege: every command runs as ``uid:gid`` (1000 by default) with no capabilities
(``--cap-drop ALL``), ``no-new-privileges`` and the engine's default seccomp profile; init runs as uid 0
without capabilities, so commands can neither signal nor ptrace it. ``run_as_root`` adds back ``ROOT_CAPS``,
``cap_add`` named ones; ``runtime`` picks the OCI runtime (e.g. runsc).

``network=allowlist``: the container still has no network; its PID 1 is the egress forwarder (egress.py,
forwarder.py; it reaps orphans like the shell init, and ``kill -1`` cannot touch it), which relays
127.0.0.1:3128 to this process's allow-list proxy through a bind-mounted unix socket. start() waits until
the forwarder is listening; the image needs python3 (>= 3.8) for it.

Work dir: with ``workdir_mb`` (the default) a size-limited ext4 disk (disk.py) bind-mounted from the host
(needs a local engine and root); with ``workdir_mb=None`` a Docker named volume (works with remote engines and
rootless Docker), chowned to the command user by a one-shot container holding only CAP_CHOWN; its size is
then bounded only per file (``max_file_mb``). The allow-list's socket needs a local engine. A sandbox
serves one caller at a time.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import select
import shlex
import socket
import struct
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import docker
from docker.errors import APIError, DockerException, NotFound
from docker.types import DeviceRequest, Ulimit

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox._common import (
    REAP_WRAPPER,
    OutputCapture,
    SandboxError,
    check_ro_binds,
    default_run_id,
    host_dir_prefix,
    new_sandbox_name,
    pid_alive,
    reap_dead_dirs,
    sandbox_path,
    writable_path,
)
from klong_megatron.sandbox.base import ExecResult
from klong_megatron.sandbox.disk import WorkDisk
from klong_megatron.sandbox.docker_hosts import Engine, EngineDown, hosts_for, is_engine_down, make_client
from klong_megatron.sandbox.egress import NET_DIR, EgressProxy, forwarder_argv, proxy_env

log = logging.getLogger(__name__)

LABEL = "klong.sandbox"
RUN_LABEL = "klong.run"
HOST_LABEL = "klong.host"
PID_LABEL = "klong.pid"
# PID 1: waits forever and reaps every orphan (dash's wait reaps any child); `kill -1` cannot touch it.
INIT = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 86400 & wait $!; done"]
# run_as_root adds back what package installs need (dpkg chowns, apt drops to _apt); never NET_RAW, SYS_ADMIN.
ROOT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL")
KILL_PROBE_S = 3.0  # the in-container kill must finish within this, else the container is restarted
TMP_INODES_PER_MB = 256  # /tmp tmpfs: one inode per 4 KiB of its size (the kernel default is half the RAM's pages)

_reaped_once: set[str] = set()  # the first start on each engine in a process sweeps leftovers of dead processes
_live: dict[str, DockerSandbox] = {}
_live_lock = threading.Lock()


def _client() -> docker.DockerClient:
    return make_client(None)


def reap_leftovers(client: docker.DockerClient | None = None, run_id: str | None = None) -> list[str]:
    """Remove sandbox containers (and work volumes) whose creating process on this host is gone.

    ``run_id`` limits the sweep to one run's containers (None: every run). Containers of live
    processes are never touched, so concurrent jobs sharing an engine are safe. Returns the names.
    """
    client = client or _client()
    host = socket.gethostname()
    removed = []
    filters = {"label": [LABEL] + ([f"{RUN_LABEL}={run_id}"] if run_id else [])}
    for c in client.containers.list(all=True, filters=filters):
        labels = c.labels
        owner_gone = labels.get(HOST_LABEL) == host and not pid_alive(int(labels.get(PID_LABEL, "0")) or -1)
        if owner_gone and c.name not in _live:
            try:
                c.remove(force=True, v=True)
                client.api.remove_volume(f"{c.name}-work", force=True)
            except NotFound:
                pass
            removed.append(c.name)
    if removed:
        log.info("reaped %d leftover sandbox container(s): %s", len(removed), ", ".join(removed))
    return removed


def _close_all_at_exit() -> None:
    with _live_lock:
        live = list(_live.values())
    for sb in live:
        sb.close()


atexit.register(_close_all_at_exit)


class DockerSandbox:
    """A container with a writable work volume; see the module docstring for the life cycle."""

    def __init__(self, cfg: SandboxConfig, client: docker.DockerClient | None = None) -> None:
        """``client``: use this engine; None: place the sandbox on one of ``cfg.docker_hosts`` at start()."""
        self.cfg = cfg
        self.run_id = cfg.run_id or default_run_id()
        self.name = new_sandbox_name(self.run_id)
        self._client = client
        self._container: Any = None
        self._oom_kills = 0
        self._lock = threading.Lock()
        self._restarter: threading.Thread | None = None
        self._closing = False
        self.egress: EgressProxy | None = None
        """network=allowlist: the proxy (``egress.refusals`` lists what was refused)."""
        self._forwarder_starts = 0
        self._disk: WorkDisk | None = None
        self.engine: Engine | None = None
        """The engine this sandbox was placed on (None when a client was given)."""

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._container is not None:
            return
        hosts = hosts_for(self.cfg)
        engine = self.engine = hosts.place() if self._client is None else None
        try:
            self._start()
        except (DockerException, OSError, EngineDown) as e:
            self.close()
            if engine is None or not is_engine_down(e):
                raise
            hosts.mark_down(engine, e)
            if isinstance(e, EngineDown):
                raise
            raise EngineDown(f"sandbox {self.name}: Docker engine {engine.url} is down: {e}") from e

    def _start(self) -> None:
        if self.engine is not None:
            self._client = self.engine.client
            self.engine.sweep_orphans()
        key = self.engine.url if self.engine else ""
        if key not in _reaped_once:
            _reaped_once.add(key)
            reap_leftovers(self._client)
            reap_dead_dirs(self.cfg.host_dir)
        cfg = self.cfg
        self._closing = False
        check_ro_binds(cfg)
        try:
            volumes = {self._work_volume(): {"bind": cfg.workdir, "mode": "rw"}}
        except SandboxError:
            self.close()  # removes a half-made volume or disk
            raise
        for spec in cfg.ro_binds:
            host, _, inside = spec.partition(":")
            volumes[host] = {"bind": inside, "mode": "ro"}
        init, network, env = INIT, cfg.network, {"HOME": "/tmp", **cfg.env}
        if cfg.network == "allowlist":  # no network at all; HTTP(S) goes through the forwarder (PID 1)
            net_dir = tempfile.mkdtemp(prefix=host_dir_prefix() + "net-", dir=cfg.host_dir)
            self.egress = EgressProxy(cfg.allow_rules, net_dir, self.name)
            self.egress.start()
            volumes[net_dir] = {"bind": NET_DIR, "mode": "ro"}
            init, network, env = (
                forwarder_argv("--init"),
                "none",
                {"HOME": "/tmp", **proxy_env(cfg.pip_index_url), **cfg.env},
            )
        fsize = cfg.max_file_mb * 1024 * 1024
        ulimits = [
            Ulimit(name="fsize", soft=fsize, hard=fsize),
            Ulimit(name="nofile", soft=cfg.nofile, hard=cfg.nofile),
        ]
        if cfg.cpu_time_s:
            ulimits.append(Ulimit(name="cpu", soft=cfg.cpu_time_s, hard=cfg.cpu_time_s))
        gpus = [DeviceRequest(count=cfg.gpus, capabilities=[["gpu"]])] if cfg.gpus else None
        with _live_lock:
            _live[self.name] = self
        try:
            self._container = self._client.containers.run(
                cfg.image,
                init,
                name=self.name,
                detach=True,
                labels={
                    LABEL: "1",
                    RUN_LABEL: self.run_id,
                    HOST_LABEL: socket.gethostname(),
                    PID_LABEL: str(os.getpid()),
                },
                network_mode=network,
                mem_limit=f"{cfg.memory_mb}m",
                memswap_limit=f"{cfg.memory_mb}m",
                nano_cpus=int(cfg.cpus * 1e9),
                pids_limit=cfg.pids,
                read_only=cfg.read_only_root,
                tmpfs={"/tmp": f"size={cfg.tmp_mb}m,nr_inodes={cfg.tmp_mb * TMP_INODES_PER_MB},mode=1777"},
                volumes=volumes,
                **self._privileges(),  # no working_dir: the engine would chown it to init's root; execs set theirs
                environment=env,
                ulimits=ulimits,
                device_requests=gpus,
            )
            if self.egress is not None:
                self._wait_forwarder()
        except DockerException as e:
            self.close()
            why = (
                " (network=allowlist runs python3 >= 3.8 from the image as the container's init)"
                if init != INIT
                else ""
            )
            raise SandboxError(f"sandbox {self.name}: cannot start image {cfg.image!r}{why}: {e}") from e
        except SandboxError:
            self.close()
            raise

    def _wait_forwarder(self, within_s: float = 30.0) -> None:
        """Wait for the forwarder (PID 1) to print its next "ready" line; a container that exits raises."""
        self._forwarder_starts += 1
        api = self._client.api
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            logs = api.logs(self.name)
            if logs.count(b"ready\n") >= self._forwarder_starts:
                return
            if not api.inspect_container(self.name)["State"]["Running"]:
                break
            time.sleep(0.02)
        tail = api.logs(self.name)[-600:].decode(errors="replace").strip()
        raise SandboxError(
            f"sandbox {self.name}: the egress forwarder did not start (network=allowlist needs python3 >= 3.8 "
            f"in image {self.cfg.image!r}); container output: {tail or '(none)'}"
        )

    def close(self) -> None:
        """Remove the container (killing running commands) and its work volume (idempotent)."""
        self._closing = True
        with _live_lock:
            _live.pop(self.name, None)
        if self.egress is not None:
            self.egress.close()
            self.egress = None
        if self._client is None:
            return
        self._wait_restart()
        try:
            self._client.api.remove_container(self.name, force=True, v=True)
        except NotFound:
            pass
        except (DockerException, OSError) as e:
            log.warning("sandbox %s: remove failed (%s); the reaper will retry", self.name, e)
            if self.engine is not None:  # removed when the engine is next used by this process
                self.engine.orphans.append(self.name)
        try:
            self._client.api.remove_volume(f"{self.name}-work", force=True)
        except (DockerException, OSError):
            pass
        if self._disk is not None:
            self._disk.remove()
            self._disk = None
        self._container = None
        if self.engine is not None:
            hosts_for(self.cfg).release(self.engine)
            self.engine, self._client = None, None

    # -- least privilege --------------------------------------------------------------------------
    @property
    def user(self) -> str:
        """``uid:gid`` of every command (init runs as uid 0 without capabilities, out of the commands' reach)."""
        return "0:0" if self.cfg.run_as_root else f"{self.cfg.uid}:{self.cfg.gid}"

    def _privileges(self) -> dict[str, Any]:
        """docker run options: no capabilities but the documented ones, no-new-privileges, the default
        seccomp profile (none is named, so the engine applies its own), the chosen OCI runtime."""
        caps = [*(ROOT_CAPS if self.cfg.run_as_root else ()), *self.cfg.cap_add]
        return {
            "user": "0:0",
            "cap_drop": ["ALL"],
            "cap_add": [c.upper().removeprefix("CAP_") for c in caps] or None,
            "security_opt": ["no-new-privileges:true"],
            "runtime": self.cfg.runtime,
        }

    def _work_volume(self) -> str:
        """The host side of the work dir: a size-limited disk (``workdir_mb``) or a named volume owned by
        the command user (chowned once by a throwaway container with CAP_CHOWN only)."""
        cfg = self.cfg
        uid, gid = (0, 0) if cfg.run_as_root else (cfg.uid, cfg.gid)
        if cfg.workdir_mb is not None:
            self._disk = WorkDisk(cfg.workdir_mb, cfg.host_dir, uid, gid)
            return str(self._disk.create())
        volume = f"{self.name}-work"
        if uid:
            try:
                self._client.containers.run(
                    cfg.image,
                    ["chown", f"{uid}:{gid}", "/w"],
                    name=f"{self.name}-chown",
                    labels={
                        LABEL: "1",
                        RUN_LABEL: self.run_id,
                        HOST_LABEL: socket.gethostname(),
                        PID_LABEL: str(os.getpid()),
                    },
                    volumes={volume: {"bind": "/w", "mode": "rw"}},
                    network_mode="none",
                    remove=True,
                    **{**self._privileges(), "cap_add": ["CHOWN"]},
                )
            except DockerException as e:
                raise SandboxError(f"sandbox {self.name}: cannot prepare the work volume: {e}") from e
        return volume

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_all(self, why: str) -> None:
        """Kill every process but init from inside; if even that cannot run within KILL_PROBE_S (pids
        exhausted, a runtime that never closes the stream), kill the container and start it again in the
        background (the next call waits for it)."""
        api = self._client.api
        try:
            kill = ["/bin/sh", "-c", "for _ in 1 2 3; do kill -KILL -1; done; exit 0"]
            probe = api.exec_create(self.name, kill, user=self.user)["Id"]
            sock = api.exec_start(probe, socket=True)
            try:
                sink = OutputCapture(1024)
                done = _pump_frames(sock, time.monotonic() + KILL_PROBE_S, sink, sink, _buffered_bytes(sock))
            finally:
                sock.close()
            if done and api.exec_inspect(probe)["ExitCode"] == 0:
                log.warning("sandbox %s: %s; killed its processes", self.name, why)
                return
        except (APIError, OSError):
            pass
        self._restarter = threading.Thread(target=self._restart, args=(why,), daemon=True)
        self._restarter.start()

    def _wait_restart(self) -> None:
        if self._restarter is not None:
            self._restarter.join()
            self._restarter = None

    def _restart(self, why: str) -> None:
        log.warning("sandbox %s: %s; restarting the container (work dir kept)", self.name, why)
        api = self._client.api
        try:
            api.kill(self.name)
        except APIError:
            pass  # already stopped
        api.start(self.name)
        if self.egress is not None:
            try:
                self._wait_forwarder()
            except SandboxError as e:
                log.warning("%s", e)

    # -- commands ---------------------------------------------------------------------------------
    def exec(
        self, cmd: str, *, timeout: float, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> ExecResult:
        if self._container is None:
            raise SandboxError(f"sandbox {self.name} is not started")
        closed = f"sandbox {self.name} was closed while a command ran; it was killed"
        with self._lock:
            self._wait_restart()
            try:
                try:
                    res = self._exec(cmd, timeout, cwd, env)
                except (APIError, OSError) as e:
                    if self._closing:
                        raise SandboxError(closed) from e
                    if self._running():
                        raise
                    self._restart(f"container found dead ({e})")
                    res = self._exec(cmd, timeout, cwd, env)
            except (DockerException, OSError) as e:
                if self.engine is None or not is_engine_down(e):
                    raise
                hosts_for(self.cfg).mark_down(self.engine, e)
                raise EngineDown(f"sandbox {self.name}: Docker engine {self.engine.url} is down: {e}") from e
        if self._closing:  # close() from another thread removed the container under the command
            raise SandboxError(closed)
        return res

    def _running(self) -> bool:
        try:
            return self._client.api.inspect_container(self.name)["State"]["Running"]
        except NotFound as e:
            raise SandboxError(f"sandbox {self.name}: container was removed from outside") from e

    def _exec(self, cmd: str, timeout: float, cwd: str | None, env: dict[str, str] | None) -> ExecResult:
        api = self._client.api
        t0 = time.monotonic()
        exec_id = api.exec_create(
            self.name,
            ["/bin/sh", "-c", REAP_WRAPPER, "sh", cmd],
            workdir=sandbox_path(self.cfg.workdir, cwd) if cwd else self.cfg.workdir,
            environment=env or None,
            user=self.user,
        )["Id"]
        sock = api.exec_start(exec_id, socket=True)
        out, err = OutputCapture(self.cfg.max_output_bytes), OutputCapture(self.cfg.max_output_bytes)
        try:
            finished = _pump_frames(sock, t0 + timeout, out, err, _buffered_bytes(sock))
        finally:
            sock.close()
        if not finished:
            self._kill_all(f"command timed out after {timeout:.1f}s")
            return ExecResult(None, out.text(), err.text(), True, time.monotonic() - t0, out.truncated or err.truncated)
        code = api.exec_inspect(exec_id)["ExitCode"]
        oom = code == 137 and self._new_oom_kill()
        return ExecResult(
            code, out.text(), err.text(), False, time.monotonic() - t0, out.truncated or err.truncated, oom_killed=oom
        )

    def _new_oom_kill(self) -> bool:
        """True when the container's memory cgroup counted a new OOM kill (cgroup v1 or v2)."""
        probe = "cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null"
        out = self._client.api.exec_start(self._client.api.exec_create(self.name, ["/bin/sh", "-c", probe])["Id"])
        m = re.search(rb"oom_kill (\d+)", out)
        count = int(m.group(1)) if m else 0
        new, self._oom_kills = count > self._oom_kills, count
        return new

    # -- files ------------------------------------------------------------------------------------
    def write_file(self, path: str, data: bytes | str) -> None:
        target = writable_path(self.cfg.workdir, path)
        payload = data.encode() if isinstance(data, str) else data
        parent = os.path.dirname(target)
        res = self.exec(f"mkdir -p {shlex.quote(parent)}", timeout=30)
        if res.exit_code != 0:
            raise OSError(f"sandbox {self.name}: cannot create {parent}: {res.stderr.strip()}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(os.path.basename(target))
            info.size, info.mode, info.mtime = len(payload), 0o644, int(time.time())
            info.uid, info.gid = (int(x) for x in self.user.split(":"))
            tar.addfile(info, io.BytesIO(payload))
        try:
            self._client.api.put_archive(self.name, parent, buf.getvalue())
        except APIError as e:
            raise OSError(f"sandbox {self.name}: cannot write {target}: {e.explanation}") from e

    def read_file(self, path: str) -> bytes:
        target = sandbox_path(self.cfg.workdir, path)
        self._wait_restart()
        try:
            stream, stat = self._client.api.get_archive(self.name, target)
        except NotFound as e:
            raise FileNotFoundError(f"sandbox {self.name}: no such file: {target}") from e
        data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise IsADirectoryError(f"sandbox {self.name}: not a regular file: {target}")
            f = tar.extractfile(member)
            assert f is not None
            return f.read()

    def export(self, dest: str | Path) -> Path:
        """Copy the work directory's contents into ``dest`` (created); symlinks stay links."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        self._wait_restart()
        stream, _ = self._client.api.get_archive(self.name, self.cfg.workdir.rstrip("/") + "/.")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            tar.extractall(dest, filter="data")
        return dest


def _buffered_bytes(sock: Any) -> bytes:
    """Stream bytes that the HTTP client read ahead together with the upgrade response's headers.

    The hijacked socket sits under a buffered reader; a fast command's first frames can already be in
    that buffer (seen under load), and reading the raw socket alone would lose them.
    """
    raw = getattr(sock, "_sock", sock)
    raw.setblocking(False)
    try:
        reader = sock._response.raw._fp.fp
        return (reader.read1(1 << 20) or b"") if reader is not None else b""
    except (AttributeError, BlockingIOError, ValueError):
        return b""


def _pump_frames(sock: Any, deadline: float, out: OutputCapture, err: OutputCapture, initial: bytes = b"") -> bool:
    """Demultiplex Docker's 8-byte-header frames into the captures; False when the deadline passed."""
    buf = bytearray(initial)
    raw = getattr(sock, "_sock", sock)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        while len(buf) >= 8:
            kind, size = struct.unpack(">BxxxL", buf[:8])
            if len(buf) < 8 + size:
                break
            (err if kind == 2 else out).feed(bytes(buf[8 : 8 + size]))
            del buf[: 8 + size]
        ready, _, _ = select.select([raw], [], [], min(left, 1.0))
        if not ready:
            continue
        try:
            chunk = raw.recv(1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return True
        buf += chunk

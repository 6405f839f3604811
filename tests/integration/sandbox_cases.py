"""Shared helpers of the sandbox tests: one parametrization over both backends, small limits."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox import make_sandbox
from klong_megatron.sandbox.base import Sandbox
from klong_megatron.sandbox.disk import disk_support_problem

# Every container/work dir of this test process carries this run id, so the leftovers check is exact.
RUN_ID = f"pytest-{os.getpid()}"
BACKENDS = [pytest.param("docker", marks=pytest.mark.docker), pytest.param("bwrap", marks=pytest.mark.bwrap)]
# "docker-runsc": the Docker backend under gVisor's runsc runtime (sandbox.runtime=runsc); skips, saying why,
# where runsc is not registered with the engine or cannot run on this kernel.
RUNSC = pytest.param("docker-runsc", marks=pytest.mark.docker)
# Work dir disks (workdir_mb) need root; elsewhere the sandboxes run without a work dir limit.
DISKS = disk_support_problem() is None


def small_config(backend: str, **over: object) -> SandboxConfig:
    """Limits small enough that adversarial commands cannot hurt a 2-core, 24 GiB machine."""
    kw: dict[str, object] = dict(
        backend=backend, memory_mb=256, cpus=1.0, pids=64, max_output_bytes=64_000, tmp_mb=64, run_id=RUN_ID
    )
    kw["workdir_mb"] = 64 if DISKS else None
    if backend == "docker-runsc":
        if why := runsc_problem():
            pytest.skip(why)
        kw.update(backend="docker", runtime="runsc", pids=1024)  # gVisor's host threads count as pids
    kw.update(over)
    return SandboxConfig(**kw)  # type: ignore[arg-type]


@functools.cache
def runsc_problem() -> str | None:
    """Why Docker sandboxes cannot use ``runtime=runsc`` here (None when a runsc container runs)."""
    import docker

    try:
        client = docker.from_env(timeout=30)
        if "runsc" not in client.info().get("Runtimes", {}):
            return (
                "runsc is not registered with the Docker engine (apt-get install runsc; tools/docker_engine.sh runsc)"
            )
        client.containers.run(
            SandboxConfig().image,
            ["true"],
            runtime="runsc",
            network_mode="none",
            remove=True,
            labels={"klong.run": RUN_ID},
        )
    except Exception as e:  # the engine's own words: e.g. the platform cannot run on this kernel
        return f"runsc cannot run a container on this host: {e}"
    return None


def started(backend: str, **over: object) -> Sandbox:
    sb = make_sandbox(small_config(backend, **over))
    sb.start()
    return sb


def host_processes_with(marker: str) -> list[str]:
    """Command lines of host processes containing ``marker`` (containers' processes included)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append(f"{p.name}: {cmd}")
    return found


def wait_until_gone(marker: str, within_s: float = 3.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while (left := host_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def resource_ok(name: str) -> bool:
    """True when the docker engine answers (the only resource the leftovers check needs to ask about)."""
    assert name == "docker"
    try:
        import docker

        return bool(docker.from_env(timeout=5).ping())
    except Exception:  # engine absent or down: nothing of ours can remain in it
        return False


def wait_until_present(marker: str, within_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while not (found := host_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


class HostHttpServer:
    """A real HTTP server on the host's 127.0.0.1 that records what reached it (GET answers, POST echoes)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.hits: list[tuple[str, str, dict[str, str]]] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bytes) -> None:
                hits.append((self.command, self.path, dict(self.headers)))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(f"served by {label}".encode())

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

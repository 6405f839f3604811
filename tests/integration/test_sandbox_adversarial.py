"""Hostile commands against both backends: each ends within timeout + 2 s, the host is unaffected and
the result says what happened. The last test checks that no container or process of the suite remains."""

from __future__ import annotations

import http.server
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sandbox_cases import BACKENDS, RUN_ID, host_processes_with, resource_ok, started, wait_until_gone

from klong_megatron.sandbox.base import ExecResult, Sandbox

GRACE_S = 2.0


def timed(sb: Sandbox, cmd: str, timeout: float) -> ExecResult:
    t0 = time.monotonic()
    res = sb.exec(cmd, timeout=timeout)
    assert time.monotonic() - t0 < timeout + GRACE_S, f"{cmd!r} took {time.monotonic() - t0:.1f}s"
    return res


@pytest.fixture(scope="class", params=BACKENDS)
def sb(request: pytest.FixtureRequest):
    box = started(request.param)
    yield box
    box.close()


class TestHostileCommands:
    def test_infinite_loop_is_stopped_at_the_timeout(self, sb: Sandbox) -> None:
        res = timed(sb, "while :; do :; done", timeout=1.5)
        assert res.timed_out and res.exit_code is None
        assert timed(sb, "echo alive", timeout=10).stdout == "alive\n"

    def test_fork_bomb_is_contained(self, sb: Sandbox) -> None:
        if type(sb).__name__ == "BwrapSandbox" and os.geteuid() != 0:
            pytest.skip("bwrap bounds processes with a per-sandbox uid only when run as root")
        timed(sb, "bash -c ':(){ :|:& };:' 2>/dev/null; sleep 1", timeout=5)
        assert os.fork is not None and _host_can_fork()
        left = timed(sb, "ps -e --no-headers | wc -l", timeout=10)
        assert left.exit_code == 0 and int(left.stdout) < 10, left.stdout

    def test_memory_hog_fails_and_says_out_of_memory(self, sb: Sandbox) -> None:
        res = timed(sb, "python3 -c 'x = b\"x\" * (1 << 30); print(len(x))'", timeout=20)
        assert res.exit_code != 0 and not res.stdout
        assert res.oom_killed or "MemoryError" in res.stderr, res
        assert timed(sb, "echo alive", timeout=10).stdout == "alive\n"

    def test_hundred_megabytes_of_output_are_truncated(self, sb: Sandbox) -> None:
        res = timed(sb, "head -c 100000000 /dev/zero | tr '\\0' a", timeout=20)
        assert res.exit_code == 0 and res.truncated
        assert len(res.stdout) < 70_000 and res.stdout.startswith("aaaa") and res.stdout.endswith("aaaa")

    def test_setsid_background_escapee_is_killed(self, sb: Sandbox) -> None:
        res = timed(sb, "setsid sh -c 'sleep 3131' >/dev/null 2>&1 </dev/null & echo launched", timeout=10)
        assert res.stdout == "launched\n"
        assert not wait_until_gone("sleep 3131")

    def test_network_egress_to_the_host_loopback_fails(self, sb: Sandbox) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            code = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/leak', timeout=3)"
            res = timed(sb, f'python3 -c "{code}"', timeout=10)
        finally:
            server.shutdown()
        assert res.exit_code != 0 and ("refused" in res.stderr.lower() or "unreachable" in res.stderr.lower())
        assert hits == []

    def test_host_files_outside_the_sandbox_are_not_visible(self, sb: Sandbox) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".secret", dir="/tmp") as f:
            f.write("host secret")
            f.flush()
            res = timed(sb, f"cat {f.name}; ls {Path(__file__).parent}", timeout=10)
        assert res.exit_code != 0 and "host secret" not in res.stdout
        assert "No such file" in res.stderr

    def test_writing_outside_the_work_dir_is_refused(self, sb: Sandbox) -> None:
        marker = f"/usr/klong-escape-{os.getpid()}"
        res = timed(sb, f"touch {marker} || touch /escape || echo pwned > /etc/escape", timeout=10)
        assert res.exit_code != 0 and "Read-only file system" in res.stderr
        assert not Path(marker).exists() and not Path("/etc/escape").exists()


def _host_can_fork() -> bool:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sixteen_sandboxes_work_concurrently(backend: str) -> None:
    def job(i: int) -> tuple[str, bytes]:
        box = started(backend, memory_mb=128, pids=32)
        try:
            box.write_file("in.txt", f"{i}\n")
            res = box.exec("python3 -c 'import sys; print(int(open(\"in.txt\").read()) ** 2)' > out.txt", timeout=60)
            assert res.exit_code == 0, res
            return box.exec("cat out.txt", timeout=30).stdout, box.read_file("out.txt")
        finally:
            box.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(job, range(16)))
    assert [int(out) for out, _ in results] == [i * i for i in range(16)]
    assert [int(raw) for _, raw in results] == [i * i for i in range(16)]


def test_nothing_of_the_suite_remains() -> None:
    """Runs last in this file: every sandbox above has been closed by its fixture or job."""
    if resource_ok("docker"):
        import docker

        left = docker.from_env().containers.list(all=True, filters={"label": f"klong.run={RUN_ID}"})
        assert not left, [c.name for c in left]
    marker = f"klong-sbx-{os.getpid()}-"
    assert not host_processes_with(marker), host_processes_with(marker)
    assert not list(Path(tempfile.gettempdir()).glob(f"klong-sbx-{os.getpid()}-*"))

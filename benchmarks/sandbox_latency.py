"""Sandbox latency and tool throughput, per backend.

Measures (median over many repetitions, same run, same machine):
  start        start() of a fresh sandbox (Docker: container create+start; bwrap: work dir)
  exec         round trip of `exec("true")` in a started sandbox
  bash tool    ToolSet.call("bash", "echo hi") throughput: 1 sandbox sequentially (the baseline) and
               16 sandboxes used concurrently from 16 threads; the ratio is the concurrency speed-up.
  allowlist    start and exec again with network=allowlist (Docker: forwarder as init; bwrap: forwarder
               per command), and one HTTP GET to a local server through the egress proxy vs the same GET
               made directly on the host (the baseline), median of --gets requests from one process.
  hardening    start and exec with the hardened defaults (non-root uid, no capabilities, no-new-privileges,
               a 10 GiB loop-mounted work dir disk; bwrap: + its seccomp filter) vs the previous defaults
               (Docker: root, the engine's default capabilities, no no-new-privileges, a named volume;
               bwrap: a plain work dir, no seccomp filter), and Docker under gVisor's runsc where it runs.

Run: .venv/bin/python benchmarks/sandbox_latency.py [--backends docker bwrap] [--repeat 20] [--gets 200]
     [--only hardening]
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.progress import track
from rich.table import Table

from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.sandbox import bwrap, make_sandbox
from klong_megatron.sandbox.base import Sandbox
from klong_megatron.sandbox.docker import DockerSandbox
from klong_megatron.sandbox.tools import ToolSet

# Median milliseconds of N sequential GETs of URL (through the proxy variables when they are set).
GET_LOOP = """
import statistics, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=10).read()
    times.append(time.perf_counter() - t0)
print(statistics.median(times) * 1e3)
"""


def _cfg(backend: str, **over: object) -> SandboxConfig:
    kw: dict[str, object] = {"backend": backend, "memory_mb": 512, "pids": 128, "run_id": "bench", **over}
    return SandboxConfig(**kw)  # type: ignore[arg-type]


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"x" * 1024
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def http_get_ms(backend: str, gets: int) -> tuple[float, float]:
    """(direct GET on the host, GET from an allowlist sandbox through the proxy), median ms each."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        direct = subprocess.run([sys.executable, "-c", GET_LOOP, url, str(gets)], capture_output=True, text=True)
        with make_sandbox(_cfg(backend, network="allowlist", allow=[url[7:-1]])) as sb:
            sb.write_file("get.py", GET_LOOP)
            res = sb.exec(f"python3 get.py {url} {gets}", timeout=600, env={"no_proxy": "", "NO_PROXY": ""})
            assert res.exit_code == 0, res
        return float(direct.stdout), float(res.stdout)
    finally:
        server.shutdown()


class _PreviousDockerDefaults(DockerSandbox):
    """The Docker sandbox as it was before hardening: root, the engine's capabilities, no no-new-privileges."""

    @property
    def user(self) -> str:
        return "0:0"

    def _privileges(self) -> dict[str, object]:
        return {"runtime": self.cfg.runtime}


def _make(backend: str, variant: str, **over: object) -> Sandbox:
    """``variant``: hardened (the defaults), previous (see _PreviousDockerDefaults; bwrap: no disk, no filter)."""
    if variant == "previous":
        over = {**over, "workdir_mb": None}
    cfg = _cfg(backend, **over)
    return _PreviousDockerDefaults(cfg) if variant == "previous" and backend == "docker" else make_sandbox(cfg)


def start_latency(backend: str, repeat: int, variant: str = "hardened", **over: object) -> list[float]:
    times = []
    for _ in track(range(repeat), description=f"{backend} {variant} {over or ''}: start"):
        sb = _make(backend, variant, **over)
        t0 = time.perf_counter()
        sb.start()
        times.append(time.perf_counter() - t0)
        sb.close()
    return times


def exec_latency(backend: str, repeat: int, variant: str = "hardened", **over: object) -> list[float]:
    with _make(backend, variant, **over) as sb:
        sb.exec("true", timeout=30)  # warm-up
        times = []
        for _ in track(range(repeat), description=f"{backend} {variant} {over or ''}: exec"):
            t0 = time.perf_counter()
            sb.exec("true", timeout=30)
            times.append(time.perf_counter() - t0)
    return times


def bash_throughput(backend: str, n_sandboxes: int, calls_each: int) -> float:
    """Tool calls per second with ``n_sandboxes`` used concurrently (one thread each)."""
    boxes = [make_sandbox(_cfg(backend)) for _ in range(n_sandboxes)]
    with ThreadPoolExecutor(n_sandboxes) as pool:
        list(pool.map(lambda b: b.start(), boxes))
        tools = [ToolSet(b, ToolsConfig()) for b in boxes]

        def work(t: ToolSet) -> None:
            for _ in range(calls_each):
                assert t.call("bash", {"command": "echo hi"}).ok

        t0 = time.perf_counter()
        list(pool.map(work, tools))
        elapsed = time.perf_counter() - t0
        list(pool.map(lambda b: b.close(), boxes))
    return n_sandboxes * calls_each / elapsed


def hardening_table(backends: list[str], repeat: int) -> Table:
    table = Table(title="Hardened vs previous sandbox defaults, ms (medians; same run)")
    for col in ("backend", "variant", "start ms", "exec ms", "uid CapEff NoNewPrivs"):
        table.add_column(col, justify="right")
    rows = [(b, v, {}) for b in backends for v in ("previous", "hardened")]
    if "docker" in backends:
        rows.append(("docker", "hardened + runsc", {"runtime": "runsc", "pids": 1024}))
    for backend, variant, over in rows:
        base = "previous" if variant == "previous" else "hardened"
        if backend == "bwrap" and base == "previous":
            saved, bwrap.filter_fd = bwrap.filter_fd, lambda: None
        try:
            start = statistics.median(start_latency(backend, repeat, base, **over)) * 1e3
            ex = statistics.median(exec_latency(backend, repeat * 3, base, **over)) * 1e3
            with _make(backend, base, **over) as sb:
                probe = "id -u; grep -E 'CapEff|NoNewPrivs' /proc/self/status | awk '{print $2}'"
                who = " ".join(sb.exec(probe, timeout=30).stdout.split())
        except Exception as e:  # e.g. runsc not registered or not runnable here: say so in the table
            table.add_row(backend, variant, "-", "-", f"not run: {str(e)[:60]}")
            continue
        finally:
            if backend == "bwrap" and base == "previous":
                bwrap.filter_fd = saved
        table.add_row(backend, variant, f"{start:.1f}", f"{ex:.1f}", who)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["docker", "bwrap"], choices=["docker", "bwrap"])
    ap.add_argument("--repeat", type=int, default=20, help="repetitions per latency median")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--calls", type=int, default=10, help="bash calls per sandbox in the throughput test")
    ap.add_argument("--gets", type=int, default=200, help="HTTP GETs per median in the allow-list test")
    ap.add_argument("--only", choices=["hardening"], help="run only this table")
    args = ap.parse_args()
    console = Console()
    if args.only == "hardening":
        console.print(hardening_table(args.backends, args.repeat))
        return
    table = Table(title="Sandbox latency and bash-tool throughput (medians; same run)")
    for col in ("backend", "start ms", "exec ms", "bash calls/s x1", f"bash calls/s x{args.concurrent}", "speed-up"):
        table.add_column(col, justify="right")
    for backend in args.backends:
        start = statistics.median(start_latency(backend, args.repeat)) * 1e3
        ex = statistics.median(exec_latency(backend, args.repeat * 3)) * 1e3
        console.print(f"{backend}: throughput ...")
        one = bash_throughput(backend, 1, args.calls * 4)
        many = bash_throughput(backend, args.concurrent, args.calls)
        table.add_row(backend, f"{start:.1f}", f"{ex:.1f}", f"{one:.1f}", f"{many:.1f}", f"{many / one:.2f}x")
    console.print(table)
    net = Table(title="network=allowlist vs none, ms (medians; same run); GET: host direct vs sandbox via proxy")
    for col in ("backend", "start none", "start allow", "exec none", "exec allow", "GET direct", "GET proxy", "ratio"):
        net.add_column(col, justify="right")
    allow = {"network": "allowlist", "allow": ["mirror.invalid"]}
    for backend in args.backends:
        starts = [statistics.median(start_latency(backend, args.repeat, **o)) * 1e3 for o in ({}, allow)]
        execs = [statistics.median(exec_latency(backend, args.repeat * 3, **o)) * 1e3 for o in ({}, allow)]
        console.print(f"{backend}: {args.gets} GETs direct and via the proxy ...")
        direct, proxied = http_get_ms(backend, args.gets)
        cells = [*starts, *execs, direct, proxied]
        net.add_row(backend, *(f"{c:.1f}" for c in cells), f"{proxied / direct:.1f}x")
    console.print(net)
    console.print(hardening_table(args.backends, args.repeat))


if __name__ == "__main__":
    main()

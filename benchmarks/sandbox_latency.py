"""Sandbox latency and tool throughput, per backend.

Measures (median over many repetitions, same run, same machine):
  start        start() of a fresh sandbox (Docker: container create+start; bwrap: work dir)
  exec         round trip of `exec("true")` in a started sandbox
  bash tool    ToolSet.call("bash", "echo hi") throughput: 1 sandbox sequentially (the baseline) and
               16 sandboxes used concurrently from 16 threads; the ratio is the concurrency speed-up.

Run: .venv/bin/python benchmarks/sandbox_latency.py [--backends docker bwrap] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.progress import track
from rich.table import Table

from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.sandbox import make_sandbox
from klong_megatron.sandbox.tools import ToolSet


def _cfg(backend: str) -> SandboxConfig:
    return SandboxConfig(backend=backend, memory_mb=512, pids=128, run_id="bench")


def start_latency(backend: str, repeat: int) -> list[float]:
    times = []
    for _ in track(range(repeat), description=f"{backend}: start"):
        sb = make_sandbox(_cfg(backend))
        t0 = time.perf_counter()
        sb.start()
        times.append(time.perf_counter() - t0)
        sb.close()
    return times


def exec_latency(backend: str, repeat: int) -> list[float]:
    with make_sandbox(_cfg(backend)) as sb:
        sb.exec("true", timeout=30)  # warm-up
        times = []
        for _ in track(range(repeat), description=f"{backend}: exec"):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["docker", "bwrap"], choices=["docker", "bwrap"])
    ap.add_argument("--repeat", type=int, default=20, help="repetitions per latency median")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--calls", type=int, default=10, help="bash calls per sandbox in the throughput test")
    args = ap.parse_args()
    console = Console()
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


if __name__ == "__main__":
    main()

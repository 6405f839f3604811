"""Load on the rollout service: 1,000 concurrent rollouts, per-turn overhead, memory, a SIGKILL mid-run.

The real ``RolloutService`` (rollout/service.py: refill workers, fsynced ``rollouts.jsonl`` and ``groups.jsonl``)
runs the real ``AgentLoop`` with the real ``ToolSet``; only the far edges are stand-ins: an engine that answers
every turn at once with the same pre-tokenized ``bash`` call (``ZeroLatencyEngine`` of rollout_overhead.py) and
``MemorySandbox``, an in-memory sandbox double whose commands print ``ok`` at once. What is left is our own
work per turn: context building, decoding, tool-call parsing, the tool set, rendering the observation, the
worker-thread hop, and per rollout the fsynced append and the group log.

Per-turn overhead = CPU time of the process / turns (all threads; on an idle machine with one event loop this
is the wall time per turn; on a shared, oversubscribed one the wall time is set by the other jobs). Memory per
rollout = (peak RSS during the run - RSS before it) / peak concurrently running rollouts (sampled every 20 ms).
The trainer side takes nothing (``taken`` stays 0) and ``max_ahead`` = the number of groups, so the service runs exactly
those groups and stops.

``--kill``: runs the service in a child process on a fresh directory, SIGKILLs it once a third of the rollouts
are stored, starts it again on the same directory and checks afterwards that every rollout is stored exactly
once and every group logged exactly once with all its members at the right offsets (lost / duplicated = 0).

    python benchmarks/rollout_service_load.py [--levels 1,100,1000] [--turns 20] [--group-size 8] [--kill]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_overhead import ZeroLatencyEngine  # noqa: E402

from klong_megatron.config.data import ContextPolicyConfig  # noqa: E402
from klong_megatron.config.rollout import RolloutConfig, SamplingConfig  # noqa: E402
from klong_megatron.data.context import ContextPolicy  # noqa: E402
from klong_megatron.data.render import Renderer, load_tokenizer  # noqa: E402
from klong_megatron.data.trajectory import Message  # noqa: E402
from klong_megatron.rollout.agent import AgentLoop  # noqa: E402
from klong_megatron.rollout.manager import RolloutTask  # noqa: E402
from klong_megatron.rollout.service import RolloutService, read_group_log  # noqa: E402
from klong_megatron.rollout.toolcalls import format_hermes  # noqa: E402
from klong_megatron.sandbox.base import ExecResult  # noqa: E402
from klong_megatron.sandbox.tools import ToolSet  # noqa: E402


class MemorySandbox:
    """Sandbox double: files in a dict, every command prints ``ok`` at once (the contract's methods only)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def start(self) -> None: ...

    def exec(self, cmd: str, *, timeout: float, cwd: str | None = None, env: dict | None = None) -> ExecResult:
        return ExecResult(0, "ok\n", "", False, 0.0, False)

    def write_file(self, path: str, data: bytes | str) -> None:
        self.files[path] = data.encode() if isinstance(data, str) else data

    def read_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def export(self, dest: str | Path) -> Path:
        return Path(dest)

    def close(self) -> None: ...


def make_service(out: Path, concurrency: int, groups: int, group_size: int, turns: int) -> RolloutService:
    """A service over ``out`` running ``groups`` groups of ``group_size`` rollouts of ``turns`` turns each."""
    tok = load_tokenizer("byte")
    renderer = Renderer(tok)
    policy = ContextPolicy.from_renderer(ContextPolicyConfig(max_len=4096, overlap=256, gen_reserve=160), renderer)
    text = "Next step.\n" + format_hermes("bash", {"command": "echo hi"})
    engine = ZeroLatencyEngine(tok(text, add_special_tokens=False)["input_ids"] + [renderer.eot_id])
    agent = AgentLoop(
        engine, renderer, policy, RolloutConfig(sampling=SamplingConfig(max_new_tokens=128), max_turns=turns)
    )
    system = Message("system", "You are an agent. Tools: bash.")

    def groups_of(stage: int, index: int) -> list[RolloutTask]:
        msgs = [system, Message("user", f"Task {index}.")]
        return [RolloutTask(f"s{stage}g{index}", msgs, sample=j) for j in range(group_size)]

    def rollout_fn_of(stage: int):
        async def rollout(task: RolloutTask):
            return await agent.run(task, ToolSet(MemorySandbox()))

        return rollout

    return RolloutService(out, groups_of, rollout_fn_of, concurrency=concurrency, max_ahead=groups)


async def run_service(svc: RolloutService, groups: int, on_status: Any = None) -> None:
    """Start ``svc`` and wait until ``groups`` groups are logged."""
    await svc.start()
    try:
        while len(svc.logged) < groups:
            if on_status is not None:
                on_status(svc.status())
            await asyncio.sleep(0.02)
    finally:
        await svc.close()


def measure(concurrency: int, groups: int, group_size: int, turns: int, out: Path) -> dict[str, float]:
    svc = make_service(out, concurrency, groups, group_size, turns)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = {"rss": base, "running": 0}
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            time.sleep(0.02)

    def on_status(st: dict[str, Any]) -> None:
        peak["running"] = max(peak["running"], st["running"])

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(run_service(svc, groups, on_status))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    sampler.join()
    records = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(records) == groups * group_size and svc.failed == 0
    turns_done = sum(int(r["meta"]["turns"]) for r in records)
    return {
        "rollouts": len(records),
        "turns": turns_done,
        "wall": wall,
        "cpu": cpu,
        "running": peak["running"],
        "mb_per_rollout": (peak["rss"] - base) / 2**20 / max(1, peak["running"]),
    }


def check_store(out: Path, groups: int, group_size: int) -> dict[str, int]:
    """Every expected rollout stored once, every group logged once, complete, offsets pointing at its records."""
    data = (out / "rollouts.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in data.splitlines() if line.strip()]
    want = {f"s0g{g}/{j}" for g in range(groups) for j in range(group_size)}
    log = read_group_log(out / "groups.jsonl")
    names = Counter(e["group"] for e in log)
    bad_offsets = 0
    for e in log:
        for rid, off in zip(e["ids"], e["offsets"], strict=True):
            line = data[off : data.index(b"\n", off)]
            bad_offsets += json.loads(line)["id"] != rid
    return {
        "stored": len(ids),
        "duplicated": len(ids) - len(set(ids)) + sum(n - 1 for n in names.values()),
        "lost": len(want - set(ids)),
        "groups_logged": len(names),
        "incomplete_groups": sum(len(e["ids"]) != group_size or e["status"] != "complete" for e in log),
        "bad_offsets": bad_offsets,
    }


def kill_check(concurrency: int, groups: int, group_size: int, turns: int, out: Path) -> dict[str, int]:
    """SIGKILL the service process once a third of its rollouts are stored; restart it; check the files."""
    argv = [sys.executable, __file__, "--child", str(out), "--levels", str(concurrency), "--groups", str(groups),
            "--group-size", str(group_size), "--turns", str(turns)]  # fmt: skip
    store = out / "rollouts.jsonl"
    child = subprocess.Popen(argv)
    total = groups * group_size
    while child.poll() is None:
        if store.exists() and store.read_bytes().count(b"\n") >= total // 3:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the service finished before it could be killed: use more groups or turns"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = store.read_bytes().count(b"\n")
    subprocess.run(argv, check=True, timeout=600)
    return {"stored_before_kill": before, **check_store(out, groups, group_size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", default="1,100,1000", help="concurrent rollouts (the service's concurrency)")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups", type=int, default=0, help="groups per level (0: 2 x concurrency / group size)")
    p.add_argument("--kill", action="store_true", help="also run the SIGKILL check at the highest level")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    def n_groups(c: int) -> int:
        return args.groups or max(2, -(-2 * c // args.group_size))

    if args.child:  # one service run on a given directory (the --kill check's child process)
        c = levels[0]
        asyncio.run(
            run_service(make_service(Path(args.child), c, n_groups(c), args.group_size, args.turns), n_groups(c))
        )
        return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for c in levels:
            rows.append((c, measure(c, n_groups(c), args.group_size, args.turns, Path(d) / f"c{c}")))
        killed = (
            kill_check(levels[-1], n_groups(levels[-1]), args.group_size, args.turns, Path(d) / "kill")
            if args.kill
            else None
        )
    base = rows[0][1]["cpu"] / rows[0][1]["turns"]
    table = Table(title=f"rollout service load (zero-latency engine, in-memory sandbox, {args.turns} turns/rollout)")
    cols = (
        "concurrency",
        "peak running",
        "rollouts",
        "turns",
        "wall s",
        "CPU s",
        "CPU ms/turn",
        "vs first",
        "MB/rollout",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for c, r in rows:
        per_turn = r["cpu"] / r["turns"]
        cells = (c, r["running"], r["rollouts"], r["turns"], f"{r['wall']:.1f}", f"{r['cpu']:.1f}",
                 f"{per_turn * 1e3:.3f}", f"{per_turn / base:.2f}x", f"{r['mb_per_rollout']:.3f}")  # fmt: skip
        table.add_row(*map(str, cells))
    Console().print(table)
    if killed is not None:
        Console().print(f"SIGKILL of the service at concurrency {levels[-1]}: " + json.dumps(killed))
        assert killed["lost"] == killed["duplicated"] == killed["incomplete_groups"] == killed["bad_offsets"] == 0


if __name__ == "__main__":
    main()

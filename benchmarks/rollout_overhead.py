"""Orchestration overhead of the rollout stack: agent loop + manager + store, no model, no sandbox.

An engine with zero latency (it answers every turn at once with the same pre-tokenized tool call)
and a trivial tool (returns "ok") leave only our own work: context building with the ContextPolicy,
decoding, tool-call parsing, rendering observations with the chat template, the worker-thread hop
of each tool call, recording, and the fsynced store. Per-turn overhead = wall time / turns (one
event loop, so this is the CPU cost of one turn); the ratio column compares with concurrency 1,
measured in the same run.

    python benchmarks/rollout_overhead.py [--turns 20] [--levels 1,64,512]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.config.rollout import RolloutConfig, SamplingConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.trajectory import Message
from klong_megatron.rollout.agent import AgentLoop
from klong_megatron.rollout.engine import Generation, SamplingParams, WeightUpdate
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.store import TrajectoryStore
from klong_megatron.rollout.toolcalls import format_hermes


class ZeroLatencyEngine:
    """Benchmark stand-in for the model: answers instantly with one fixed tool-call turn."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.logprobs = [-0.1] * len(ids)

    async def generate(self, input_ids: list[int], sampling: SamplingParams) -> Generation:
        return Generation(self.ids, self.logprobs, "stop", len(input_ids), "bench")

    async def abort(self) -> None: ...

    async def update_weights(self, update: WeightUpdate) -> None: ...

    async def health(self) -> bool:
        return True

    async def close(self) -> None: ...


class OkTools:
    def call(self, name: str, arguments: str) -> str:
        return "ok"


def run_level(concurrency: int, rollouts: int, turns: int, workdir: Path) -> dict[str, float]:
    tok = load_tokenizer("byte")
    renderer = Renderer(tok)
    policy = ContextPolicy.from_renderer(ContextPolicyConfig(max_len=4096, overlap=256, gen_reserve=160), renderer)
    text = "Next step.\n" + format_hermes("bash", {"command": "echo hi"})
    engine = ZeroLatencyEngine(tok(text, add_special_tokens=False)["input_ids"] + [renderer.eot_id])
    cfg = RolloutConfig(sampling=SamplingConfig(max_new_tokens=128), max_turns=turns, timeout_s=3600)
    agent = AgentLoop(engine, renderer, policy, cfg)
    tools = OkTools()

    async def rollout(task: RolloutTask):
        return await agent.run(task, tools)

    system = Message("system", "You are an agent. Tools: bash.")
    tasks = [RolloutTask("bench", [system, Message("user", f"Task {i}.")], sample=i) for i in range(rollouts)]
    store = TrajectoryStore(workdir / f"c{concurrency}.jsonl")
    manager = RolloutManager(rollout, store, concurrency=concurrency, progress=sys.stderr.isatty())
    t0 = time.perf_counter()
    stats = asyncio.run(manager.run(tasks))
    wall = time.perf_counter() - t0
    assert stats.finished == rollouts and stats.failed == 0, stats.errors[:3]
    return {"wall": wall, "turns": stats.turns, "rollouts": rollouts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--levels", default="1,64,512")
    p.add_argument("--rollouts-per-slot", type=int, default=2, help="rollouts = max(8, slots x this)")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for c in levels:
            rows.append((c, run_level(c, max(8, c * args.rollouts_per_slot), args.turns, Path(d))))
    base = rows[0][1]["wall"] / rows[0][1]["turns"]
    table = Table(title=f"rollout orchestration overhead (zero-latency engine, trivial tool, {args.turns} turns)")
    for col in ("concurrent", "rollouts", "turns", "wall s", "turns/s", "per-turn ms", "vs c=1"):
        table.add_column(col, justify="right")
    for c, r in rows:
        per_turn = r["wall"] / r["turns"]
        table.add_row(
            str(c),
            str(r["rollouts"]),
            str(r["turns"]),
            f"{r['wall']:.2f}",
            f"{r['turns'] / r['wall']:.0f}",
            f"{per_turn * 1e3:.3f}",
            f"{per_turn / base:.2f}x",
        )
    Console().print(table)


if __name__ == "__main__":
    main()

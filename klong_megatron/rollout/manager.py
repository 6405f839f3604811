"""Runs many rollouts concurrently on one asyncio loop and stores them crash-safely.

Dataflow: tasks (``RolloutTask``: id, sample index, initial messages) -> skip those already in
the ``TrajectoryStore`` -> ``concurrency`` workers pull tasks -> ``rollout_fn(task)`` (the agent
loop: its own sandbox, engine calls, tools) -> ``Trajectory`` -> ``store.append`` (fsync) ->
metrics (turns/s, generated tokens/s, share of rollout time spent in sandbox tools) and a
progress bar.

A rollout that raises (a crashed sandbox, every engine server down) is logged with its id and
retried from scratch up to ``max_retries`` times; one that still fails is reported in
``ManagerStats.failed`` and not stored, so a restarted manager tries it again.

Limits: one process, one event loop; a rollout_fn must not block the loop (run blocking tool
calls in threads).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.rollout.store import TrajectoryStore

log = logging.getLogger(__name__)


@dataclass
class RolloutTask:
    """One rollout to run: sample ``sample`` of task ``task_id`` (GRPO groups share ``task_id``)."""

    task_id: str
    messages: list[Message]
    """Initial conversation: system prompt (with the tool descriptions) and the task."""
    sample: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.task_id}/{self.sample}"


RolloutFn = Callable[[RolloutTask], Awaitable[Trajectory]]


@dataclass
class ManagerStats:
    finished: int = 0
    skipped: int = 0
    """already in the store when the run started"""
    failed: int = 0
    retries: int = 0
    turns: int = 0
    tokens: int = 0
    rollout_s: float = 0.0
    """sum of rollout durations"""
    tool_s: float = 0.0
    wall_s: float = 0.0
    timed_out: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, traj: Trajectory) -> None:
        m = traj.meta
        self.finished += 1
        self.turns += int(m.get("turns", 0))
        self.tokens += int(m.get("tokens", 0))
        self.rollout_s += float(m.get("duration_s", 0.0))
        self.tool_s += float(m.get("tool_s", 0.0))
        self.timed_out += bool(m.get("timed_out", False))

    def rates(self) -> dict[str, float]:
        wall = max(self.wall_s, 1e-9)
        return {
            "turns_per_s": self.turns / wall,
            "tokens_per_s": self.tokens / wall,
            "sandbox_share": self.tool_s / max(self.rollout_s, 1e-9),
        }


class RolloutManager:
    """``concurrency`` rollouts at a time; finished trajectories go to ``store`` exactly once."""

    def __init__(
        self,
        rollout_fn: RolloutFn,
        store: TrajectoryStore,
        *,
        concurrency: int = 8,
        max_retries: int = 2,
        progress: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.rollout_fn = rollout_fn
        self.store = store
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.progress = progress

    async def run(self, tasks: Iterable[RolloutTask]) -> ManagerStats:
        """Run every task not yet in the store; returns the run's statistics."""
        stats = ManagerStats()
        queue: asyncio.Queue[RolloutTask] = asyncio.Queue()
        seen: set[str] = set()
        for task in tasks:
            if task.id in seen:
                raise ValueError(f"task {task.id!r} is listed twice")
            seen.add(task.id)
            if task.id in self.store:
                stats.skipped += 1
            else:
                queue.put_nowait(task)
        bar = tqdm(total=queue.qsize(), desc="rollouts", disable=not self.progress, smoothing=0.1)
        start = time.perf_counter()

        async def worker() -> None:
            while True:
                try:
                    task = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                traj = await self._attempt(task, stats)
                if traj is not None:
                    await asyncio.to_thread(self.store.append, traj.to_json())
                    stats.add(traj)
                stats.wall_s = time.perf_counter() - start
                bar.update(1)
                r = stats.rates()
                bar.set_postfix(
                    turns_s=f"{r['turns_per_s']:.1f}",
                    tok_s=f"{r['tokens_per_s']:.0f}",
                    sandbox=f"{r['sandbox_share']:.0%}",
                    failed=stats.failed,
                    refresh=False,
                )

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, max(1, queue.qsize())))))
        finally:
            bar.close()
        stats.wall_s = time.perf_counter() - start
        return stats

    async def _attempt(self, task: RolloutTask, stats: ManagerStats) -> Trajectory | None:
        traj, errors = await run_with_retries(self.rollout_fn, task, self.max_retries)
        stats.retries += len(errors) - (traj is None)
        if traj is None:
            stats.failed += 1
            stats.errors.append(errors[-1])
        return traj


async def run_with_retries(
    rollout_fn: RolloutFn, task: RolloutTask, max_retries: int
) -> tuple[Trajectory | None, list[str]]:
    """``rollout_fn(task)``, retried from scratch after an exception up to ``max_retries`` times.

    Returns the trajectory (None when every attempt failed) and one message per failed attempt."""
    errors: list[str] = []
    for attempt in range(max_retries + 1):
        try:
            traj = await rollout_fn(task)
        except Exception as e:  # a crashed sandbox/server: report and retry with a fresh rollout
            msg = f"rollout {task.id} attempt {attempt + 1}/{max_retries + 1} failed: {type(e).__name__}: {e}"
            log.warning(msg)
            errors.append(msg)
            continue
        if traj.id != task.id:
            raise ValueError(f"rollout_fn returned trajectory {traj.id!r} for task {task.id!r}")
        return traj, errors
    return None, errors

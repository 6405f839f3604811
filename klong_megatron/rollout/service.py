"""Rollout service: ``concurrency`` rollouts always running (continuous refill), complete groups logged.

Dataflow: ``control(stage, taken)`` -> new groups of the current stage, in index order, from
``groups_of(stage, index)`` (a pure function: a restart draws the same groups) -> their members queue
FIFO -> ``concurrency`` workers run ``rollout_fn_of(stage)(task)`` (retried like the manager; with
``grade_fn_of`` that is the generation only, and ``grade_fn_of(stage)(task, trajectory)`` grades it beside
the slot, which is free for the next rollout at once: judging never holds a rollout server) -> each
judged trajectory is appended to ``rollouts.jsonl`` (fsync) -> once every member of a group is stored
(or failed every attempt) the group gets one line in ``groups.jsonl`` (fsync). That log is the buffer:
a consumer (the trainer, ``rl/batches.py``) takes complete groups in log order and reports how many log
entries it has used as ``taken``. A worker that frees up starts the next member at once, so rollouts of
the next batch run while the current one trains, across weight updates (every token records the policy
version that sampled it). New groups start only while ``log entries + groups in progress - taken <
max_ahead`` (how far the service may run ahead of the trainer).

Files in ``dir`` (the interface on a shared file system; this service is their only writer)::

    rollouts.jsonl  judged trajectories (TrajectoryStore: append + fsync, torn last line cut on open)
    groups.jsonl    {"group", "stage", "index", "status": complete|cancelled, "ids", "offsets", "failed"}
    service.json    {"stage", "taken", "next": {stage: next group index}} (atomic rewrite)

Restart (after SIGKILL too): stored ids, the group log and ``service.json`` are read back; every group
started (index < next) but not logged is resumed with only its missing members, so nothing is run or
stored twice and nothing is lost but the in-flight work of the killed rollouts. A stage switch
(``control`` with a higher stage) either lets started groups of older stages finish, each under its own
stage's rollout function (``stage_switch="finish"``), or cancels them (``"cancel"``: running rollouts
are cancelled, the group is logged as ``cancelled`` with what was stored). Lower stages and ``taken``
values than already seen are ignored (a restarted trainer repeats its last control).

Limits: one process, one event loop; control and status are plain method calls (``rollout/service_http.py``
serves them over HTTP for a trainer in another process).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import STAGE_SWITCH
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.rollout.manager import RolloutFn, RolloutTask, run_with_retries
from klong_megatron.rollout.store import TrajectoryStore

log = logging.getLogger(__name__)

GroupsOf = Callable[[int, int], list[RolloutTask]]
"""(stage, group index) -> the group's member rollouts (ids unique across the run)"""
GradeFn = Callable[[RolloutTask, Trajectory], Awaitable[Trajectory]]
"""(task, generated trajectory) -> the judged trajectory"""


@dataclass
class _Group:
    name: str
    stage: int
    index: int
    members: list[str]
    offsets: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    running: set[asyncio.Task] = field(default_factory=set)
    grading: set[asyncio.Task] = field(default_factory=set)


def read_group_log(path: str | Path, start: int = 0) -> list[dict[str, Any]]:
    """Entries ``start..`` of a group log; a last line still being written (no newline) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the part after the last newline is incomplete (or empty)
    return [json.loads(line) for line in lines[start:] if line.strip()]


class RolloutService:
    """Continuous refill over ``dir``: call ``start``, then ``control`` as the consumer progresses."""

    def __init__(
        self,
        dir: str | Path,
        groups_of: GroupsOf,
        rollout_fn_of: Callable[[int], RolloutFn],
        *,
        concurrency: int,
        max_ahead: int,
        stage_switch: str = "finish",
        max_retries: int = 2,
        grade_fn_of: Callable[[int], GradeFn] | None = None,
    ) -> None:
        if concurrency < 1 or max_ahead < 1:
            raise ValueError(f"concurrency and max_ahead must be >= 1, got {concurrency}, {max_ahead}")
        if stage_switch not in STAGE_SWITCH:
            raise ValueError(f"stage_switch must be one of {STAGE_SWITCH}, got {stage_switch!r}")
        self.dir = Path(dir)
        self.groups_of, self.rollout_fn_of, self.grade_fn_of = groups_of, rollout_fn_of, grade_fn_of
        self.concurrency, self.max_ahead, self.stage_switch = concurrency, max_ahead, stage_switch
        self.max_retries = max_retries
        self.store = TrajectoryStore(self.dir / "rollouts.jsonl")
        self.log_path = self.dir / "groups.jsonl"
        self.control_path = self.dir / "service.json"
        saved = json.loads(self.control_path.read_text()) if self.control_path.exists() else {}
        self.stage: int = saved.get("stage", 0)
        self.taken: int = saved.get("taken", 0)
        self.next: dict[int, int] = {int(k): v for k, v in saved.get("next", {}).items()}
        self.logged = read_group_log(self.log_path)
        self._groups: dict[str, _Group] = {}
        self._queue: collections.deque[tuple[_Group, RolloutTask]] = collections.deque()
        self._fns: dict[int, RolloutFn] = {}
        self._grade_fns: dict[int, GradeFn] = {}
        self._wake = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self.finished = self.failed = 0
        self.errors: list[str] = []
        """workers that stopped with an error (``status()["errors"]``)"""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resume started-but-unlogged groups (their missing members), then run ``concurrency`` workers."""
        done = {e["group"] for e in self.logged}
        for stage in sorted(self.next):
            for index in range(self.next[stage]):
                members = self.groups_of(stage, index)
                name = _group_name(members)
                if name in done:
                    continue
                group = self._open_group(stage, index, members)
                if stage < self.stage and self.stage_switch == "cancel":
                    self._close_group(group, "cancelled")
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        for w in self._workers:
            w.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task) -> None:
        """A worker that stopped with an error (a bug, or ``groups_of`` refusing a stage) is reported loudly."""
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
            log.error("rollout service worker stopped: %s", self.errors[-1], exc_info=task.exception())

    async def close(self) -> None:
        """Cancel the workers (running rollouts are dropped; a restart resumes their groups)."""
        grading = [t for g in self._groups.values() for t in g.grading]
        for w in self._workers + grading:
            w.cancel()
        await asyncio.gather(*self._workers, *grading, return_exceptions=True)  # errors: reported by _worker_done
        self._workers = []

    async def control(self, stage: int | None = None, taken: int | None = None) -> dict[str, Any]:
        """The consumer's progress: its current ``stage`` and the group-log entries it has ``taken``."""
        if taken is not None and taken > self.taken:
            self.taken = taken
        if stage is not None and stage > self.stage:
            self.stage = stage
            if self.stage_switch == "cancel":
                for group in [g for g in self._groups.values() if g.stage < stage]:
                    for t in group.running | group.grading:
                        t.cancel()
                    self._close_group(group, "cancelled")
        self._save_control()
        self._wake.set()
        return self.status()

    def status(self) -> dict[str, Any]:
        """Counters for monitoring and tests (JSON-serialisable)."""
        running = sum(len(g.running) for g in self._groups.values())
        grading = sum(len(g.grading) for g in self._groups.values())
        return {
            "stage": self.stage, "taken": self.taken, "logged": len(self.logged), "in_progress": len(self._groups),
            "running": running, "grading": grading, "queued": len(self._queue), "stored": len(self.store),
            "finished": self.finished,
            "failed": self.failed, "concurrency": self.concurrency, "max_ahead": self.max_ahead,
            "workers": sum(not w.done() for w in self._workers), "errors": self.errors[-5:],
        }  # fmt: skip

    # ------------------------------------------------------------------ groups
    def _open_group(self, stage: int, index: int, members: list[RolloutTask]) -> _Group:
        group = _Group(_group_name(members), stage, index, [t.id for t in members])
        for t in members:
            if t.id in self.store:  # stored before a restart; its offset is found again when the group closes
                group.offsets[t.id] = -1
            else:
                self._queue.append((group, t))
        self._groups[group.name] = group
        if len(group.offsets) == len(group.members):
            self._close_group(group, "complete")
        return group

    def _new_group(self) -> bool:
        if len(self.logged) + len(self._groups) - self.taken >= self.max_ahead:
            return False
        index = self.next.get(self.stage, 0)
        self.next[self.stage] = index + 1
        self._save_control()
        self._open_group(self.stage, index, self.groups_of(self.stage, index))
        return True

    def _close_group(self, group: _Group, status: str) -> None:
        if any(v < 0 for v in group.offsets.values()):
            group.offsets |= _find_offsets(self.store.path, {k for k, v in group.offsets.items() if v < 0})
        ids = [m for m in group.members if m in group.offsets]
        entry = {"group": group.name, "stage": group.stage, "index": group.index, "status": status, "ids": ids,
                 "offsets": [group.offsets[m] for m in ids], "failed": group.failed}  # fmt: skip
        with open(self.log_path, "ab") as f:
            f.write((json.dumps(entry) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.logged.append(entry)
        self._groups.pop(group.name, None)
        self._queue = collections.deque((g, t) for g, t in self._queue if g is not group)

    def _save_control(self) -> None:
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": self.stage, "taken": self.taken, "next": self.next}))
        os.replace(tmp, self.control_path)

    # ------------------------------------------------------------------ workers
    async def _worker(self) -> None:
        while True:
            if not self._queue and not self._new_group():
                self._wake.clear()
                await self._wake.wait()
                continue
            group, task = self._queue.popleft()
            fn = self._fns.get(group.stage) or self._fns.setdefault(group.stage, self.rollout_fn_of(group.stage))
            child = asyncio.create_task(run_with_retries(fn, task, self.max_retries))
            group.running.add(child)
            slot_start = time.monotonic()
            try:
                traj, errors = await child
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # close(): this worker itself is cancelled
                    raise
                continue  # its group was cancelled by a stage switch
            finally:
                group.running.discard(child)
            if traj is not None:  # the time it held its slot: sandbox start + agent loop + export, retries included
                traj.meta["slot_s"] = round(time.monotonic() - slot_start, 4)
            if traj is not None and self.grade_fn_of is not None and group.name in self._groups:
                grading = asyncio.create_task(self._grade(group, task, traj))  # beside the slot: next rollout now
                group.grading.add(grading)
                grading.add_done_callback(group.grading.discard)
                continue
            await self._finish(group, task, traj, errors[-1] if errors else "")

    async def _grade(self, group: _Group, task: RolloutTask, traj: Trajectory) -> None:
        """Grade a generated rollout outside its slot (retried ``max_retries`` times), then store it."""
        assert self.grade_fn_of is not None
        if group.stage not in self._grade_fns:
            self._grade_fns[group.stage] = self.grade_fn_of(group.stage)
        judged, error = None, ""
        for attempt in range(self.max_retries + 1):
            try:
                judged = await self._grade_fns[group.stage](task, traj)
                break
            except Exception as e:  # the judge failed: grade the same rollout again
                error = f"grading {task.id} attempt {attempt + 1}/{self.max_retries + 1}: {type(e).__name__}: {e}"
                log.warning(error)
        await self._finish(group, task, judged, error)

    async def _finish(self, group: _Group, task: RolloutTask, traj: Trajectory | None, error: str) -> None:
        """Store a judged rollout (or count a failed one); log its group once every member is done."""
        if group.name not in self._groups:  # cancelled by a stage switch meanwhile
            return
        if traj is None:
            group.failed.append(task.id)
            self.failed += 1
            log.warning("rollout %s failed every attempt: %s", task.id, error)
        else:
            group.offsets[task.id] = await asyncio.to_thread(self.store.append, traj.to_json())
            self.finished += 1
        if group.name in self._groups and len(group.offsets) + len(group.failed) == len(group.members):
            self._close_group(group, "complete")


def _group_name(members: list[RolloutTask]) -> str:
    names = {t.task_id for t in members}
    if len(names) != 1:
        raise ValueError(f"a group's rollouts must share one task_id, got {sorted(names)}")
    return names.pop()


def _find_offsets(path: Path, ids: set[str]) -> dict[str, int]:
    """Byte offsets of the records with ``ids`` in a JSONL file (one scan; used after a restart only)."""
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if line.strip() and (rid := str(json.loads(line)["id"])) in ids:
                found[rid] = offset
            offset += len(line)
    return found

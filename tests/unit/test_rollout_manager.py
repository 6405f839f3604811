"""Rollout manager + crash-safe store: resume, no duplicates, torn lines, retries, concurrency bound."""

from __future__ import annotations

import asyncio
import json

import pytest

from klong_megatron.data.trajectory import Message, Trajectory, read_trajectories
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.store import TrajectoryStore


def tasks(n: int, groups: int = 1) -> list[RolloutTask]:
    return [RolloutTask(f"t{i}", [Message("user", f"task {i}")], sample=s) for i in range(n) for s in range(groups)]


def fake_rollout(calls: list[str], fail: dict[str, int] | None = None, delay: float = 0.0):
    """A rollout function: fails ``fail[id]`` times for that id, then returns a trajectory."""
    fail = dict(fail or {})

    async def run(task: RolloutTask) -> Trajectory:
        calls.append(task.id)
        await asyncio.sleep(delay)
        if fail.get(task.id, 0) > 0:
            fail[task.id] -= 1
            raise RuntimeError(f"sandbox of {task.id} died")
        msgs = task.messages + [Message("assistant", "done")]
        return Trajectory(task.id, msgs, {"turns": 1, "tokens": 5, "duration_s": 0.1, "tool_s": 0.02})

    return run


def test_every_task_stored_once_and_restart_skips_finished(tmp_path):
    path = tmp_path / "s.jsonl"
    calls: list[str] = []
    stats = asyncio.run(RolloutManager(fake_rollout(calls), TrajectoryStore(path), progress=False).run(tasks(5, 2)))
    assert stats.finished == 10 and stats.turns == 10 and stats.tokens == 50
    assert abs(stats.rates()["sandbox_share"] - 0.2) < 1e-9
    again: list[str] = []
    stats2 = asyncio.run(RolloutManager(fake_rollout(again), TrajectoryStore(path), progress=False).run(tasks(6, 2)))
    assert stats2.skipped == 10 and stats2.finished == 2 and sorted(again) == ["t5/0", "t5/1"]
    ids = [t.id for t in read_trajectories(path)]
    assert len(ids) == len(set(ids)) == 12


def test_torn_last_line_is_dropped_and_that_rollout_rerun(tmp_path):
    path = tmp_path / "s.jsonl"
    asyncio.run(RolloutManager(fake_rollout([]), TrajectoryStore(path), progress=False).run(tasks(3)))
    data = path.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last + 17])  # the process died while writing the third record
    store = TrajectoryStore(path)
    assert store.repaired_bytes == 17 and len(store) == 2
    calls: list[str] = []
    asyncio.run(RolloutManager(fake_rollout(calls), store, progress=False).run(tasks(3)))
    assert len(calls) == 1
    assert sorted(t.id for t in read_trajectories(path)) == ["t0/0", "t1/0", "t2/0"]


def test_crashed_rollout_is_retried_and_a_hopeless_one_reported_not_stored(tmp_path):
    calls: list[str] = []
    fn = fake_rollout(calls, fail={"t1/0": 1, "t2/0": 5})
    store = TrajectoryStore(tmp_path / "s.jsonl")
    stats = asyncio.run(RolloutManager(fn, store, max_retries=2, progress=False).run(tasks(3)))
    assert stats.finished == 2 and stats.failed == 1 and stats.retries == 3
    assert calls.count("t2/0") == 3 and "sandbox of t2/0 died" in stats.errors[0]
    assert "t2/0" not in store and "t1/0" in store


def test_concurrency_is_bounded(tmp_path):
    active, peak = 0, 0

    async def run(task: RolloutTask) -> Trajectory:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return Trajectory(task.id, task.messages, {})

    store = TrajectoryStore(tmp_path / "s.jsonl")
    asyncio.run(RolloutManager(run, store, concurrency=4, progress=False).run(tasks(20)))
    assert peak == 4


def test_duplicate_ids_and_bad_store_lines_are_named(tmp_path):
    store = TrajectoryStore(tmp_path / "s.jsonl")
    store.append({"id": "a/0", "messages": [], "meta": {}})
    with pytest.raises(ValueError, match="already stored"):
        store.append({"id": "a/0", "messages": [], "meta": {}})
    with pytest.raises(ValueError, match="listed twice"):
        asyncio.run(RolloutManager(fake_rollout([]), store, progress=False).run(tasks(1) + tasks(1)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x"}) + "\n" + "{oops}\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        TrajectoryStore(bad)

"""RolloutService (``rollout/service.py``): continuous refill, whole groups, restart, stage switch.

The rollout function is a test double (``_DoubleRollouts``: the far edge, agent loop + sandbox + judge,
replaced by a timed coroutine); the service, its store and its group log are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.rollout.service import RolloutService, read_group_log
from klong_megatron.rollout.store import read_at

N = 2  # rollouts per group


def _groups_of(stage: int, index: int) -> list[RolloutTask]:
    name = f"stage{stage}_group{index:05d}/t{index % 3}"
    return [RolloutTask(name, [Message("user", "go")], k, {"stage": stage, "group": name}) for k in range(N)]


class _DoubleRollouts:
    """Test double of a judged rollout: sleeps ``delay(task)`` seconds, records concurrency."""

    def __init__(self, delay=lambda task: 0.01, fail=lambda task: False) -> None:
        self.delay, self.fail = delay, fail
        self.running = self.peak = self.started = 0

    def fn_of(self, stage: int):
        async def rollout(task: RolloutTask) -> Trajectory:
            self.started += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                await asyncio.sleep(self.delay(task))
                if self.fail(task):
                    raise RuntimeError("sandbox died")
                return Trajectory(task.id, list(task.messages), {"reward": 1.0, "stage": stage, **task.meta})
            finally:
                self.running -= 1

        return rollout


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)


def _service(tmp: Path, double: _DoubleRollouts, **kw) -> RolloutService:
    kw = {"concurrency": 4, "max_ahead": 4, "max_retries": 0} | kw
    return RolloutService(tmp, _groups_of, double.fn_of, **kw)


def test_refill_keeps_slots_busy_and_logs_whole_groups_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        # member 0 of every group is slow: a slot frees early and is refilled with the next group's rollouts
        double = _DoubleRollouts(delay=lambda t: 0.15 if t.sample == 0 else 0.01)
        svc = _service(tmp_path, double, max_ahead=6)
        await svc.start()
        await _until(lambda: len(svc.logged) >= 6)
        assert double.peak == 4  # concurrency reached, never exceeded
        assert svc.status()["in_progress"] == 0  # max_ahead reached: no new group until the trainer takes some
        await svc.control(taken=6)
        await _until(lambda: len(svc.logged) >= 12)
        await svc.close()

    asyncio.run(main())
    log = read_group_log(tmp_path / "groups.jsonl")
    for entry in log:
        assert entry["status"] == "complete" and len(entry["ids"]) == N  # groups stay whole
        for rec in read_at(tmp_path / "rollouts.jsonl", entry["offsets"]):
            assert rec["meta"]["group"] == entry["group"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids))


def test_restart_resumes_started_groups_without_rerunning_stored_members(tmp_path: Path) -> None:
    async def first() -> None:
        double = _DoubleRollouts(delay=lambda t: 0.01 if t.sample == 0 else 30.0)  # member 1 never finishes
        svc = _service(tmp_path, double)
        await svc.start()
        await _until(lambda: svc.finished >= 2)
        await svc.close()  # as after a SIGKILL: members 1 were in flight, nothing logged

    asyncio.run(first())
    assert read_group_log(tmp_path / "groups.jsonl") == []
    stored = {json.loads(line)["id"] for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()}
    assert len(stored) >= 2

    double = _DoubleRollouts()

    async def second() -> None:
        svc = _service(tmp_path, double)
        await svc.start()
        await _until(lambda: len(svc.logged) >= 4)
        await svc.close()

    asyncio.run(second())
    log = read_group_log(tmp_path / "groups.jsonl")
    lines = (tmp_path / "rollouts.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids))  # nothing stored twice
    assert stored <= set(ids)
    first_groups = {i.rsplit("/", 1)[0] for i in stored}
    assert first_groups <= {e["group"] for e in log}  # the interrupted groups completed
    assert all(len(e["ids"]) == N for e in log)


@pytest.mark.parametrize("switch", ["finish", "cancel"])
def test_stage_switch_finishes_or_cancels_started_groups(tmp_path: Path, switch: str) -> None:
    gate = asyncio.Event()

    async def main() -> RolloutService:
        double = _DoubleRollouts()
        slow = double.fn_of

        def fn_of(stage: int):
            inner = slow(stage)

            async def rollout(task: RolloutTask) -> Trajectory:
                if stage == 0:
                    await gate.wait()  # stage-0 rollouts are still running at the switch
                return await inner(task)

            return rollout

        svc = RolloutService(tmp_path, _groups_of, fn_of, concurrency=4, max_ahead=4, stage_switch=switch)
        await svc.start()
        await _until(lambda: svc.status()["running"] == 4)
        await svc.control(stage=1, taken=0)
        gate.set()
        await _until(lambda: sum(e["stage"] == 1 for e in svc.logged) >= 1)
        await svc.close()
        return svc

    svc = asyncio.run(main())
    old = [e for e in svc.logged if e["stage"] == 0]
    assert old, "the stage-0 groups in progress at the switch are logged"
    want = "complete" if switch == "finish" else "cancelled"
    assert {e["status"] for e in old} == {want}
    if switch == "finish":
        assert all(len(e["ids"]) == N for e in old)


def test_a_member_that_fails_every_attempt_is_listed_and_its_group_still_closes(tmp_path: Path) -> None:
    async def main() -> RolloutService:
        svc = _service(tmp_path, _DoubleRollouts(fail=lambda t: t.sample == 1), max_ahead=2)
        await svc.start()
        await _until(lambda: len(svc.logged) >= 2)
        await svc.close()
        return svc

    svc = asyncio.run(main())
    for e in svc.logged:
        assert e["status"] == "complete" and len(e["ids"]) == 1 and e["failed"] == [f"{e['group']}/1"]


def test_lower_stage_and_taken_are_ignored(tmp_path: Path) -> None:
    async def main() -> dict:
        svc = _service(tmp_path, _DoubleRollouts())
        await svc.control(stage=2, taken=5)
        return await svc.control(stage=1, taken=3)

    status = asyncio.run(main())
    assert (status["stage"], status["taken"]) == (2, 5)
    assert json.loads((tmp_path / "service.json").read_text())["stage"] == 2


@pytest.mark.parametrize(
    ("kw", "field"),
    [({"stage_switch": "later"}, "rl.refill.stage_switch"), ({"max_ahead": -1}, "rl.refill.max_ahead")],
)
def test_refill_config_errors_name_the_field(kw: dict, field: str) -> None:
    from klong_megatron.config.rl import RefillConfig

    with pytest.raises(ValueError, match=field):
        RefillConfig(**kw)


def test_service_http_control_validates_and_applies(tmp_path: Path) -> None:
    import httpx

    from klong_megatron.rollout.service_http import ServiceClient, serve

    async def main() -> None:
        svc = _service(tmp_path, _DoubleRollouts(), max_ahead=1)
        await svc.start()
        server = serve(svc, asyncio.get_running_loop(), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            client = ServiceClient(url)
            assert (await client.control(stage=1, taken=1))["stage"] == 1
            assert (await client.status())["taken"] == 1
            async with httpx.AsyncClient() as raw:
                bad = await raw.post(f"{url}/control", json={"stage": "two"})
                assert bad.status_code == 400 and "'stage'" in bad.json()["error"]
            await client.close()
        finally:
            server.shutdown()
            await svc.close()

    asyncio.run(main())


def test_a_worker_error_is_reported_in_the_status(tmp_path: Path) -> None:
    def groups_of(stage: int, index: int) -> list[RolloutTask]:
        if stage > 0:
            raise ValueError(f"no stage {stage}")
        return _groups_of(stage, index)

    async def main() -> dict:
        svc = RolloutService(tmp_path, groups_of, _DoubleRollouts().fn_of, concurrency=2, max_ahead=8)
        await svc.start()
        await svc.control(stage=1)
        await _until(lambda: svc.status()["workers"] == 0)
        status = svc.status()
        await svc.close()
        return status

    status = asyncio.run(main())
    assert status["errors"] and "no stage 1" in status["errors"][0]


def test_grading_beside_the_slot_frees_it_for_the_next_rollout(tmp_path: Path) -> None:
    """With ``grade_fn_of`` a slow judge never holds a rollout slot: generation keeps ``concurrency``
    rollouts running while more are being graded, and a grade failure is retried on the same rollout."""
    double = _DoubleRollouts(delay=lambda t: 0.02)
    graded: list[str] = []
    failures = {"stage0_group00000/t0/0": 1}  # its first grading attempt fails

    def grade_fn_of(stage: int):
        async def grade(task: RolloutTask, traj: Trajectory) -> Trajectory:
            await asyncio.sleep(0.3)  # the judge is slower than generation
            if failures.get(task.id, 0) > 0:
                failures[task.id] -= 1
                raise RuntimeError("judge endpoint down")
            graded.append(task.id)
            traj.meta["graded"] = True
            return traj

        return grade

    peak_grading = 0

    async def main() -> RolloutService:
        nonlocal peak_grading
        svc = RolloutService(tmp_path, _groups_of, double.fn_of, grade_fn_of=grade_fn_of, concurrency=2,
                             max_ahead=6, max_retries=1)  # fmt: skip
        await svc.start()
        while len(svc.logged) < 6:
            peak_grading = max(peak_grading, svc.status()["grading"])
            await asyncio.sleep(0.005)
        await svc.close()
        return svc

    svc = asyncio.run(main())
    assert peak_grading > 2  # more rollouts in grading than there are slots: the slots went on generating
    assert double.peak <= 2
    assert all(e["status"] == "complete" and len(e["ids"]) == N for e in svc.logged)
    records = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert records and all(r["meta"]["graded"] for r in records)
    assert all(0.02 <= r["meta"]["slot_s"] < 0.3 for r in records)  # generation held the slot, grading did not
    assert "stage0_group00000/t0/0" in graded and failures["stage0_group00000/t0/0"] == 0

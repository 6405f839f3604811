"""Judge queue: eval before train, bounded concurrency, retries, metrics, and resume after a killed process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble

from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool, PrioritySemaphore
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.queue import Job, JobFailed, JudgeQueue
from klong_megatron.judge.rubric import rubric_from_dict, save_rubric

ROOT = Path(__file__).resolve().parents[2]


def _job(priority: str, name: str) -> Job:
    return Job(priority=priority, submission_dir=name, rubric="{}")


def test_eval_jobs_run_before_waiting_train_jobs(tmp_path: Path) -> None:
    order: list[str] = []

    async def go() -> dict:
        gate = asyncio.Event()

        async def runner(job: Job) -> dict:
            order.append(job.submission_dir)
            await gate.wait()
            return {"name": job.submission_dir}

        q = JudgeQueue(runner, state_dir=tmp_path, max_concurrent_jobs=2)
        await q.start()
        ids = [q.submit(_job("train", f"t{i}")) for i in range(5)]
        await asyncio.sleep(0.01)  # t0, t1 start; t2..t4 wait
        ids += [q.submit(_job("eval", f"e{i}")) for i in range(2)]
        m = q.metrics()
        gate.set()
        results = [await q.wait(i) for i in ids]
        await q.close()
        assert [r["name"] for r in results] == ["t0", "t1", "t2", "t3", "t4", "e0", "e1"]
        return m

    m = asyncio.run(go())
    assert order == ["t0", "t1", "e0", "e1", "t2", "t3", "t4"]
    assert (m["judge_queue/depth_train"], m["judge_queue/depth_eval"], m["judge_queue/running"]) == (3, 2, 2)
    assert not list((tmp_path / "pending").iterdir()) and len(list((tmp_path / "done").iterdir())) == 7


def test_concurrent_jobs_are_bounded() -> None:
    state = {"now": 0, "peak": 0}

    async def runner(job: Job) -> dict:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return {}

    async def go() -> None:
        q = JudgeQueue(runner, max_concurrent_jobs=3)
        await q.start()
        for i in [q.submit(_job("train", str(i))) for i in range(20)]:
            await q.wait(i)
        await q.close()

    asyncio.run(go())
    assert state["peak"] == 3


def test_failing_job_is_retried_then_recorded_as_failed(tmp_path: Path) -> None:
    attempts: dict[str, int] = {}

    async def runner(job: Job) -> dict:
        attempts[job.submission_dir] = attempts.get(job.submission_dir, 0) + 1
        if job.submission_dir == "bad" or attempts[job.submission_dir] == 1:
            raise RuntimeError(f"worker crashed on {job.submission_dir}")
        return {"ok": True}

    async def go() -> None:
        q = JudgeQueue(runner, state_dir=tmp_path, max_job_attempts=3)
        await q.start()
        flaky, bad = q.submit(_job("train", "flaky")), q.submit(_job("train", "bad"))
        assert await q.wait(flaky) == {"ok": True}
        with pytest.raises(JobFailed, match="worker crashed on bad"):
            await q.wait(bad)
        assert q.metrics()["judge_queue/failed"] == 1 and q.metrics()["judge_queue/retried"] == 3
        await q.close()
        with pytest.raises(JobFailed):  # the failure is on disk too
            await JudgeQueue(runner, state_dir=tmp_path).wait(bad)

    asyncio.run(go())
    assert attempts == {"flaky": 2, "bad": 3}


def test_priority_semaphore_serves_eval_waiters_first() -> None:
    async def go() -> list[str]:
        sem, got = PrioritySemaphore(1), []
        await sem.acquire(1)

        async def take(name: str, prio: int) -> None:
            await sem.acquire(prio)
            got.append(name)
            sem.release()

        tasks = [asyncio.create_task(take(f"train{i}", 1)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(take("eval", 0)))
        await asyncio.sleep(0)
        sem.release()
        await asyncio.gather(*tasks)
        return got

    assert asyncio.run(go()) == ["eval", "train0", "train1", "train2"]


_WORKER = """
import asyncio, sys
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader

url, state, cache, rubric, *subs = sys.argv[1:]

async def main():
    pool = ChatPool([url], "judge-double", max_concurrency=1)
    judge = Judge(llm=LLMGrader(pool), cache=GradeCache(cache), state_dir=state, max_concurrent_jobs=1)
    async with judge:
        ids = [judge.queue.submit(Judge.job(s, rubric)) for s in subs]
        print("submitted", flush=True)
        for i in ids:
            await judge.queue.wait(i)

asyncio.run(main())
"""


def test_jobs_survive_a_killed_judge_process_and_resume(tmp_path: Path) -> None:
    leaves = [
        {"id": f"l{i}", "requirements": f"{'PASS ' if i % 2 else ''}item {i}", "weight": 1, "sub_tasks": [],
         "task_category": "Code Development"}
        for i in range(3)
    ]  # fmt: skip
    tree = rubric_from_dict({"id": "r", "requirements": "", "weight": 1, "sub_tasks": leaves})
    save_rubric(tree, tmp_path / "rubric.json")
    subs = []
    for i in range(4):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "main.py").write_text(f"print({i})\n")
        subs.append(str(tmp_path / f"s{i}"))
    state, cache = tmp_path / "state", tmp_path / "cache.sqlite"
    with OpenAIJudgeDouble(delay_s=0.15) as srv:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-c", _WORKER, srv.url, str(state), str(cache), str(tmp_path / "rubric.json"), *subs]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(state.glob("done/*.json")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never finished a job"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = len(list((state / "done").glob("*.json")))
        pending = len(list((state / "pending").glob("*.json")))
        assert done_before >= 1 and done_before + pending == 4
        served_before = srv.served

        async def resume() -> tuple[list[str], list[dict]]:
            pool = ChatPool([srv.url], "judge-double")
            async with Judge(llm=LLMGrader(pool), cache=GradeCache(cache), state_dir=state) as judge:
                resumed = judge.queue.metrics()["judge_queue/resumed"]
                ids = [p.stem for p in (state / "pending").glob("*.json")] + [
                    p.stem for p in (state / "done").glob("*.json")
                ]
                results = [await judge.queue.wait(i) for i in ids]
            await pool.aclose()
            return resumed, results

        resumed, results = asyncio.run(resume())
    assert resumed == pending
    assert sorted(r["submission"] for r in results) == sorted(str(Path(s).resolve()) for s in subs)
    assert all(r["score"] == pytest.approx(1 / 3) and not r["invalid"] for r in results)
    assert not list((state / "pending").glob("*.json"))
    # finished jobs are not graded again after the restart
    assert srv.served - served_before <= 2 * 3 * pending  # ranking + grading per leaf
    for s in subs:
        assert json.loads(Path(s + ".grade.json").read_text())["score"] == pytest.approx(1 / 3)

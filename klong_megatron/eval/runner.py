"""klong-eval's run: every (task, sample) -> rollout in a fresh paper sandbox -> reproduction -> judge.

Dataflow::

    EvalConfig.tasks -> PaperTask folders (validated) -> staged read-only copies
    -> jobs (task, sample k), ``concurrency`` at a time:
         rollout (chat agent or token agent loop; sandbox with /paper bound from a staged copy in the
         system temp dir, ToolSet with the task's blacklist) -> out/rollouts.jsonl (append + fsync)
         -> grade_paper_rollout (monitor, reproduce.sh in a fresh sandbox, judge) -> out/results.jsonl
    -> report (eval/report.py): table, report.json, report.html

Resume: a rerun with the same output dir skips samples in results.jsonl and grades, without
re-running, rollouts already in rollouts.jsonl. A job whose infrastructure fails ``max_attempts``
times is reported, with every try's error, in out/failures.jsonl and left out (a rerun tries it again);
nothing finished is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from klong_megatron.config.eval import EvalConfig
from klong_megatron.data.trajectory import Trajectory, read_trajectories
from klong_megatron.eval.grading import grade_paper_rollout
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.rollout.store import TrajectoryStore
from klong_megatron.tasks.paperbench import PaperTask, find_task_dirs, load_paper_task
from klong_megatron.tasks.rollout import paper_rollout
from klong_megatron.tasks.workspace import paper_messages, staging_root

log = logging.getLogger(__name__)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (the failure log; a rerun retries the job and appends again)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def load_tasks(paths: list[str]) -> list[PaperTask]:
    """Every task folder under ``paths`` (validated); duplicate task ids are an error."""
    tasks: dict[str, PaperTask] = {}
    for p in paths:
        for d in find_task_dirs(p):
            t = load_paper_task(d)
            if t.task_id in tasks:
                raise ValueError(f"task id {t.task_id!r} appears twice: {tasks[t.task_id].root} and {t.root}")
            tasks[t.task_id] = t
    return list(tasks.values())


@dataclasses.dataclass
class EvalStats:
    done: int = 0
    skipped: int = 0
    graded_from_store: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    rollout_s: float = 0.0
    reproduce_s: float = 0.0
    """sum of reproduce.sh run times (reproduce.meta.json duration_s)"""
    grade_s: float = 0.0
    """sum of grading wall times (monitor + reproduction step with sandbox start/copy/export + judge)"""


class EvalRunner:
    """One evaluation in ``out``; ``await run()`` returns the graded trajectories (this run's and earlier)."""

    def __init__(self, cfg: EvalConfig, out: str | Path, agent: Any = None) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.tasks = {t.task_id: t for t in load_tasks(cfg.tasks)}
        self.agent = agent
        """Anything with ``run(RolloutTask, tools, workdir)`` -> Trajectory; None: built from cfg."""
        self.rollouts = TrajectoryStore(self.out / "rollouts.jsonl")
        self.results = TrajectoryStore(self.out / "results.jsonl")
        self.stats = EvalStats()
        self._closers: list[Any] = []
        self.stage_root = Path()

    # ------------------------------------------------------------------ engines
    async def _build_agent(self) -> Any:
        c = self.cfg
        export = str(self.out / "workdirs")
        if c.engine == "chat":
            from klong_megatron.rollout.chat import ChatAgent, ChatAgentConfig, OpenAIChatEngine

            engine = OpenAIChatEngine(c.chat)
            self._closers.append(engine.close)
            acfg = ChatAgentConfig(c.max_turns, c.time_limit_s, c.rollout.tool_timeout_s, export)
            return ChatAgent(engine, acfg)
        from klong_megatron.data.context import ContextPolicy
        from klong_megatron.data.dataset import load_tokenizer
        from klong_megatron.data.render import Renderer
        from klong_megatron.rl.servers import RolloutServers
        from klong_megatron.rollout.agent import AgentLoop

        rcfg = dataclasses.replace(c.rollout, engine="dev" if c.engine == "dev" else "sglang", timeout_s=c.time_limit_s,
                                   max_turns=c.max_turns, export_dir=export)  # fmt: skip
        servers = RolloutServers(rcfg, c.model_dir or "")
        self._closers.append(servers.close)
        await servers.wait_healthy()
        renderer = Renderer(load_tokenizer(c.data.tokenizer))
        return AgentLoop(servers.engine, renderer, ContextPolicy.from_renderer(c.data.policy, renderer), rcfg)

    # ------------------------------------------------------------------ one sample
    def _messages(self, task: PaperTask) -> list:
        c = self.cfg
        return paper_messages(task, workdir=c.sandbox.workdir, time_budget_s=c.time_limit_s,
                              reproduce_timeout_s=c.reproduce.timeout_s, gpus=c.reproduce.sandbox.gpus)  # fmt: skip

    async def _rollout(self, task: PaperTask, rtask: RolloutTask) -> Trajectory:
        tools = dataclasses.replace(self.cfg.sandbox.tools, time_budget_s=self.cfg.time_limit_s)
        return await paper_rollout(self.agent, task, rtask, sandbox=self.cfg.sandbox, tools=tools,
                                   stage_root=self.stage_root)  # fmt: skip

    async def _job(self, task: PaperTask, k: int, judge: Any, stored: dict[str, Trajectory]) -> None:
        rtask = RolloutTask(task.task_id, self._messages(task), k, {"task": task.task_id})
        if rtask.id in self.results:
            self.stats.skipped += 1
            return
        last, errors = "", []
        for attempt in range(self.cfg.max_attempts):
            try:
                traj = stored.get(rtask.id)
                if traj is None:
                    t0 = time.perf_counter()
                    traj = await self._rollout(task, rtask)
                    self.stats.rollout_s += time.perf_counter() - t0
                    await asyncio.to_thread(self.rollouts.append, traj.to_json())
                    stored[rtask.id] = traj
                else:
                    self.stats.graded_from_store += 1
                t0 = time.perf_counter()
                await grade_paper_rollout(traj, task, judge, reproduce_cfg=self.cfg.reproduce, priority="eval",
                                          max_invalid_frac=self.cfg.max_invalid_frac)  # fmt: skip
                rep = traj.meta.get("reproduce") or {}
                self.stats.reproduce_s += float(rep.get("duration_s") or 0.0)
                self.stats.grade_s += time.perf_counter() - t0
                await asyncio.to_thread(self.results.append, traj.to_json())
                self.stats.done += 1
                return
            except Exception as e:  # infrastructure (sandbox, endpoint, judge): retry, then report
                last = f"{rtask.id} attempt {attempt + 1}/{self.cfg.max_attempts}: {type(e).__name__}: {e}"
                errors.append(f"{type(e).__name__}: {e}")
                log.warning(last)
        self.stats.failed += 1
        self.stats.errors.append(last)
        record = {"id": rtask.id, "task": task.task_id, "sample": k, "rolled_out": rtask.id in stored, "errors": errors}
        await asyncio.to_thread(append_jsonl, self.out / "failures.jsonl", record)

    # ------------------------------------------------------------------ the run
    async def run(self) -> list[Trajectory]:
        from klong_megatron.judge.factory import build_judge, prepare_rubric

        c = self.cfg
        for t in self.tasks.values():
            t.rubric = prepare_rubric(t.rubric, c.judge)
        jcfg = dataclasses.replace(c.judge, cache_path=c.judge.cache_path or str(self.out / "judge" / "cache.sqlite"),
                                   state_dir=c.judge.state_dir or str(self.out / "judge" / "queue"))  # fmt: skip
        stored = {t.id: t for t in read_trajectories(self.rollouts.path)}
        start = time.perf_counter()
        judge, pool = build_judge(jcfg)
        self.stage_root = staging_root()
        try:
            if self.agent is None:
                self.agent = await self._build_agent()
            async with judge:
                sem = asyncio.Semaphore(c.concurrency)

                async def bounded(task: PaperTask, k: int) -> None:
                    async with sem:
                        await self._job(task, k, judge, stored)

                await asyncio.gather(*(bounded(t, k) for t in self.tasks.values() for k in range(c.samples)))
        finally:
            for close in self._closers:
                await close()
            if pool is not None:
                await pool.aclose()
            shutil.rmtree(self.stage_root, ignore_errors=True)
        self.stats.wall_s = time.perf_counter() - start
        wanted = {f"{t}/{k}" for t in self.tasks for k in range(c.samples)}
        return [t for t in read_trajectories(self.results.path) if t.id in wanted]

    def stats_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.stats)))

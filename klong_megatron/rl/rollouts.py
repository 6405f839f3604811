"""Judged rollouts of an RL run: tasks -> agent loop in a sandbox -> judge -> trajectory store.

``phases(stage, priority)`` builds the two halves of a judged rollout (the rollout service frees the
rollout slot between them; ``rollout_fn`` chains them for the batch rollout manager): the agent loop
under the stage's timeout and turn limit in its own sandbox (demo tasks get their files written in;
paper tasks run ``rl/paper_tasks.py``), then the judge at ``priority``; the trajectory comes back with
``meta.reward`` (or ``reward_excluded`` when the judge could not grade enough of the rubric).
``collect`` runs a fixed batch (an evaluation, an iteration without refill) and stores it in
``rollouts/<name>.jsonl``, reusing what is already stored.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import RLConfig, StageConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer
from klong_megatron.data.trajectory import Message, Trajectory, read_trajectories
from klong_megatron.eval.grading import invalid_fraction
from klong_megatron.logging import MetricsLogger
from klong_megatron.rl.paper_tasks import paper_generate, paper_grade
from klong_megatron.rl.tasks import SUBMISSION_DIR, RLTask, sample_tasks
from klong_megatron.rollout.agent import AgentLoop, sandbox_rollout_fn
from klong_megatron.rollout.manager import RolloutFn, RolloutManager, RolloutTask
from klong_megatron.rollout.service import GradeFn
from klong_megatron.rollout.store import TrajectoryStore


class RLRollouts:
    """Builds and runs judged rollouts on ``services`` (an ``RLServices`` or the rollout service's own)."""

    def __init__(
        self,
        cfg: RLConfig,
        out: Path,
        renderer: Renderer,
        ctx: ContextPolicy,
        tasks: list[RLTask],
        services: Any,
        logger: MetricsLogger,
    ) -> None:
        self.cfg, self.out, self.renderer, self.ctx = cfg, out, renderer, ctx
        self.by_id = {t.task_id: t for t in tasks}
        self.services = services
        self.logger = logger

    def agent(self, stage: StageConfig, temperature: float | None = None) -> AgentLoop:
        """The agent loop of ``stage`` (its timeout and turn limit) on the rollout servers."""
        r = self.cfg.rollout
        sampling = dataclasses.replace(
            r.sampling, temperature=r.sampling.temperature if temperature is None else temperature
        )
        rcfg = dataclasses.replace(
            r, timeout_s=stage.timeout_s, max_turns=stage.max_turns or r.max_turns, sampling=sampling,
            export_dir=str(self.out / "workdirs"),
        )  # fmt: skip
        return AgentLoop(self.services.servers.engine, self.renderer, self.ctx, rcfg)

    def phases(self, stage: StageConfig, priority: str, temperature: float | None = None) -> tuple[RolloutFn, GradeFn]:
        """(generate, grade): RolloutTask (``meta.task`` names the RL task) -> ungraded Trajectory (agent loop in
        its own sandbox, released when it returns), and (task, trajectory) -> the judged Trajectory."""
        from klong_megatron.sandbox.tools import ToolSet

        agent = self.agent(stage, temperature)
        tools_cfg = dataclasses.replace(self.cfg.sandbox.tools, time_budget_s=stage.timeout_s)

        def setup(task: RolloutTask, sandbox: Any) -> None:
            for rel, text in self.by_id[task.meta["task"]].files.items():
                sandbox.write_file(rel, text)

        run = sandbox_rollout_fn(agent, self.services.pool, lambda sb: ToolSet(sb, tools_cfg), setup)
        svc = self.services

        async def generate(task: RolloutTask) -> Trajectory:
            rl_task = self.by_id[task.meta["task"]]
            if rl_task.paper_task is not None:  # own sandbox, blacklist (tasks/rollout.py)
                return await paper_generate(svc, agent, rl_task.paper_task, task, tools_cfg)
            return await run(task)

        async def grade(task: RolloutTask, traj: Trajectory) -> Trajectory:
            rl_task = self.by_id[task.meta["task"]]
            if rl_task.paper_task is not None:  # reproduction step, monitor, judge (eval/grading.py)
                return await paper_grade(svc, rl_task.paper_task, traj, priority)
            submission = Path(traj.meta["workdir"]) / SUBMISSION_DIR
            submission.mkdir(parents=True, exist_ok=True)  # nothing submitted is graded as empty
            result = await svc.judge.grade(submission, rl_task.rubric, priority=priority, paper=rl_task.paper,
                                           addendum=rl_task.addendum)  # fmt: skip
            frac = invalid_fraction(result)
            traj.meta.update(reward=result.score, judge_per_category=result.per_category,
                             judge_token_usage=dict(result.token_usage),
                             judge_invalid=list(result.invalid), judge_invalid_frac=frac,
                             reward_excluded=frac > self.cfg.rl.max_invalid_frac)  # fmt: skip
            return traj

        return generate, grade

    def rollout_fn(self, stage: StageConfig, priority: str, temperature: float | None = None) -> RolloutFn:
        """RolloutTask -> judged Trajectory (generate, then grade: one call, as the rollout manager runs it)."""
        generate, grade = self.phases(stage, priority, temperature)

        async def rollout_and_judge(task: RolloutTask) -> Trajectory:
            return await grade(task, await generate(task))

        return rollout_and_judge

    def prompt(self, task: RLTask, stage: StageConfig) -> list[Message]:
        """The initial conversation of ``task`` under ``stage``'s time budget."""
        c = self.cfg
        return task.prompt(stage.timeout_s, workdir=c.sandbox.workdir, reproduce_timeout_s=c.reproduce.timeout_s,
                           gpus=c.reproduce.sandbox.gpus)  # fmt: skip

    async def collect(
        self,
        name: str,
        tasks: list[RLTask],
        n: int,
        stage: StageConfig,
        priority: str,
        temperature: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> list[Trajectory]:
        """``n`` judged rollouts of each task, stored in ``rollouts/<name>.jsonl`` (finished ones reused)."""
        store = TrajectoryStore(self.out / "rollouts" / f"{name}.jsonl")
        rtasks = [
            RolloutTask(f"{name}/{t.task_id}", self.prompt(t, stage), k, {"task": t.task_id, **(meta or {})})
            for t in tasks
            for k in range(n)
        ]
        manager = RolloutManager(self.rollout_fn(stage, priority, temperature), store,
                                 concurrency=self.cfg.rollout.concurrency, progress=self.logger.enabled)  # fmt: skip
        stats = await manager.run(rtasks)
        if rtasks and stats.failed == len(rtasks):
            raise RuntimeError(f"{name}: all {len(rtasks)} rollouts failed; first error: {stats.errors[0]}")
        if stats.failed:
            self.logger.info(f"[yellow]{name}: {stats.failed} rollouts failed[/yellow]: {stats.errors[:3]}")
        wanted = {t.id for t in rtasks}
        return [t for t in read_trajectories(store.path) if t.id in wanted]

    async def iteration(self, s: int, i: int, train_tasks: list[RLTask]) -> list[Trajectory]:
        """Iteration ``i`` of stage ``s`` without refill: its sampled tasks, ``rollouts_per_task`` each."""
        stage = self.cfg.stages[s]
        count = math.ceil(stage.tasks_per_iteration * self.cfg.rl.oversample)
        tasks = sample_tasks(train_tasks, count, seed=self.cfg.rl.seed, stage=s, iteration=i)
        return await self.collect(f"stage{s}_iter{i:04d}", tasks, stage.rollouts_per_task, stage, "train",
                                  meta={"stage": s, "iteration": i})  # fmt: skip

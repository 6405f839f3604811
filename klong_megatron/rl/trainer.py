"""Progressive RL: stages of iterations of rollouts -> judge -> windows -> GRPO updates -> weight sync.

Dataflow of one iteration (stage s, iteration i)::

    sample tasks (seeded by s, i) -> n rollouts each (RolloutManager, agent loop, sandbox pool,
      rollout servers over HTTP) -> each finished rollout is judged at once (train priority) and
      stored WITH its reward (append + fsync) -> windows (ContextPolicy) + group advantages
      (rl/windows.py) -> Policy.update (old/ref log-probs, PPO-clip epochs, Megatron optimizer)
      -> policy version + 1 -> checkpoint + rl_state.json -> weight sync (HF export + server reload,
      or a broadcast from rank 0) -> metrics

With ``rl.partial_rollouts`` the next iteration's rollouts start before the current batch is trained
(its rollouts then straddle a weight update: every sampled token records the policy version that
generated it, windows older than ``rl.max_staleness`` versions are dropped and TIS corrects the rest).
Evaluations (held-out tasks, eval judge priority) run before training, after the SFT warm-up and after
every stage (and every ``rl.eval_every`` iterations); ``best`` records the best-scoring checkpoint.

Resume: the state file names the next (stage, iteration); the checkpoint holds model, optimizer and
RNG; rollouts already stored for an iteration (with their rewards) are reused, never re-run or
re-judged. Only global rank 0 runs rollouts and the judge; every rank trains (rows are broadcast).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from klong_megatron.config.rl import RLConfig, StageConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer
from klong_megatron.data.trajectory import Trajectory, read_trajectories
from klong_megatron.eval.grading import invalid_fraction
from klong_megatron.judge.factory import prepare_rubric
from klong_megatron.logging import MetricsLogger
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron import cpu_compat
from klong_megatron.rl.health import HealthMonitor, RLHealthError
from klong_megatron.rl.paper_tasks import paper_rollout_and_grade
from klong_megatron.rl.policy import Policy, broadcast_object
from klong_megatron.rl.tasks import SUBMISSION_DIR, RLTask, build_task_sets, sample_tasks
from klong_megatron.rl.windows import JudgedRollout, build_rl_windows, pack_rows
from klong_megatron.rollout.agent import AgentLoop, sandbox_rollout_fn
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.store import TrajectoryStore
from klong_megatron.view.page import write_best_and_worst


@dataclasses.dataclass
class RLState:
    """Progress of a run, written atomically after every iteration (``rl_state.json``)."""

    stage: int = 0
    iteration: int = 0
    """next iteration to run in ``stage``"""
    version: int = 0
    """policy version = GRPO updates done (the rollout servers' ``weight_version``)"""
    sft_done: bool = False
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    """held-out judge score per evaluation label (initial, sft, stage0, ...)"""
    best: dict[str, Any] = dataclasses.field(default_factory=dict)
    log_step: int = 0
    """metrics step of the last logged iteration (SFT warm-up steps, then one per update): a resumed run
    continues the same W&B run at the next step"""
    wall_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """wall time per phase: ``sft`` (warm-up), ``stage<k>`` (its iterations and evaluations), ``eval_<label>``"""
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    """collapse / stall detector state (``rl/health.py``): reference entropy, stage best reward, rollbacks"""

    @classmethod
    def load(cls, path: Path) -> RLState:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)


class RLTrainer:
    """One progressive-RL run in ``output_dir`` (every rank constructs one; rank 0 drives)."""

    def __init__(self, cfg: RLConfig, output_dir: str | Path, logger: MetricsLogger) -> None:
        from klong_megatron.data.dataset import load_tokenizer

        self.cfg = cfg
        self.out = Path(output_dir)
        self.logger = logger
        self.policy = Policy(cfg)
        import torch.distributed as dist

        self.rank0 = dist.get_rank() == 0
        self.renderer = Renderer(load_tokenizer(cfg.data.tokenizer))
        self.ctx = ContextPolicy.from_renderer(cfg.data.policy, self.renderer)
        self.train_tasks, self.eval_tasks = build_task_sets(cfg.tasks)
        prepare_rubrics(self.train_tasks + self.eval_tasks, cfg.judge)
        self.by_id = {t.task_id: t for t in self.train_tasks + self.eval_tasks}
        self.save_dir = Path(cfg.trainer.save_dir or self.out / "checkpoints")
        self.state_path = self.out / "rl_state.json"
        self.state = RLState.load(self.state_path)
        self.health = HealthMonitor(cfg.rl.health, self.state.health)
        self.servers: Any = None
        self.sync: Any = None
        self.pool: Any = None
        self.judge: Any = None
        self.stop_signal: int | None = None
        self._critical = False
        self._main: asyncio.Task | None = None

    # ------------------------------------------------------------------ setup / teardown
    def _export(self, version: int) -> Path:
        path = self.out / "weights" / f"v{version:05d}"
        if not (path / "model.safetensors").exists():
            self.policy.export_hf(path, self.renderer.tokenizer)
        for old in sorted((self.out / "weights").glob("v*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    async def _start_services(self) -> None:
        from klong_megatron.judge.factory import build_judge
        from klong_megatron.rl.servers import RolloutServers
        from klong_megatron.sandbox.pool import SandboxPool
        from klong_megatron.tasks.workspace import staging_root

        jcfg = dataclasses.replace(
            self.cfg.judge,
            cache_path=self.cfg.judge.cache_path or str(self.out / "judge" / "cache.sqlite"),
            state_dir=self.cfg.judge.state_dir or str(self.out / "judge" / "queue"),
        )
        self.judge, self._judge_pool = build_judge(jcfg)
        await self.judge.__aenter__()
        self.stage_root = staging_root()  # paper tasks' read-only copies (rl/paper_tasks.py)
        self.pool = SandboxPool(self.cfg.sandbox, self.cfg.rollout.concurrency)
        await asyncio.to_thread(self.pool.start)
        self.servers = RolloutServers(self.cfg.rollout, self._export(self.state.version))
        await self.servers.wait_healthy()
        if self.cfg.rl.weight_sync == "distributed":
            self.sync = self._distributed_sync()
        await self._push(self.state.version)

    def _distributed_sync(self) -> Any:
        import socket

        import torch

        from klong_megatron.rl.weight_sync import DistributedWeightSync, free_port

        r = self.cfg.rl
        return DistributedWeightSync(
            self.servers.engine,
            master_address=r.weight_sync_address or socket.gethostname(),
            master_port=r.weight_sync_port or free_port(),
            backend="nccl" if torch.cuda.is_available() else "gloo",
            bucket_bytes=self.cfg.rollout.weight_bucket_mb << 20,
            verify=self.cfg.rollout.weight_verify,
        )

    async def _push(self, version: int) -> None:
        """The servers get policy ``version``: by broadcast (distributed) or an HF export on disk."""
        if self.sync is not None:
            await self.sync.push_model(self.policy.model, self.cfg.model, str(version))
        else:
            await self.servers.push(self._export(version), version)

    async def _stop_services(self) -> None:
        if self.sync is not None:
            await self.sync.close()
        if self.servers is not None:
            await self.servers.close()
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close)
            shutil.rmtree(self.stage_root, ignore_errors=True)
        if self.judge is not None:
            await self.judge.__aexit__(None, None, None)
            if self._judge_pool is not None:
                await self._judge_pool.aclose()

    # ------------------------------------------------------------------ rollouts + judge
    def _agent(self, stage: StageConfig, temperature: float | None = None) -> AgentLoop:
        r = self.cfg.rollout
        sampling = dataclasses.replace(
            r.sampling, temperature=r.sampling.temperature if temperature is None else temperature
        )
        rcfg = dataclasses.replace(
            r, timeout_s=stage.timeout_s, max_turns=stage.max_turns or r.max_turns, sampling=sampling,
            export_dir=str(self.out / "workdirs"),
        )  # fmt: skip
        return AgentLoop(self.servers.engine, self.renderer, self.ctx, rcfg)

    def _rollout_fn(self, agent: AgentLoop, stage: StageConfig, priority: str):
        from klong_megatron.sandbox.tools import ToolSet

        tools_cfg = dataclasses.replace(self.cfg.sandbox.tools, time_budget_s=stage.timeout_s)

        def setup(task: RolloutTask, sandbox: Any) -> None:
            for rel, text in self.by_id[task.meta["task"]].files.items():
                sandbox.write_file(rel, text)

        run = sandbox_rollout_fn(agent, self.pool, lambda sb: ToolSet(sb, tools_cfg), setup)

        async def rollout_and_judge(task: RolloutTask) -> Trajectory:
            rl_task = self.by_id[task.meta["task"]]
            if rl_task.paper_task is not None:  # own sandbox, blacklist, reproduction step (tasks/, eval/)
                return await paper_rollout_and_grade(self, agent, rl_task.paper_task, task, tools_cfg, priority)
            traj = await run(task)
            submission = Path(traj.meta["workdir"]) / SUBMISSION_DIR
            submission.mkdir(parents=True, exist_ok=True)  # nothing submitted is graded as empty
            result = await self.judge.grade(submission, rl_task.rubric, priority=priority, paper=rl_task.paper,
                                            addendum=rl_task.addendum)  # fmt: skip
            frac = invalid_fraction(result)
            traj.meta.update(reward=result.score, judge_per_category=result.per_category,
                             judge_token_usage=dict(result.token_usage),
                             judge_invalid=list(result.invalid), judge_invalid_frac=frac,
                             reward_excluded=frac > self.cfg.rl.max_invalid_frac)  # fmt: skip
            return traj

        return rollout_and_judge

    async def _collect(
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
            RolloutTask(f"{name}/{t.task_id}", self._prompt(t, stage), k, {"task": t.task_id, **(meta or {})})
            for t in tasks
            for k in range(n)
        ]
        manager = RolloutManager(self._rollout_fn(self._agent(stage, temperature), stage, priority), store,
                                 concurrency=self.cfg.rollout.concurrency, progress=self.logger.enabled)  # fmt: skip
        stats = await manager.run(rtasks)
        if rtasks and stats.failed == len(rtasks):
            raise RuntimeError(f"{name}: all {len(rtasks)} rollouts failed; first error: {stats.errors[0]}")
        if stats.failed:
            self.logger.info(f"[yellow]{name}: {stats.failed} rollouts failed[/yellow]: {stats.errors[:3]}")
        wanted = {t.id for t in rtasks}
        return [t for t in read_trajectories(store.path) if t.id in wanted]

    def _prompt(self, task: RLTask, stage: StageConfig) -> list:
        c = self.cfg
        return task.prompt(stage.timeout_s, workdir=c.sandbox.workdir, reproduce_timeout_s=c.reproduce.timeout_s,
                           gpus=c.reproduce.sandbox.gpus)  # fmt: skip

    async def _iteration_rollouts(self, s: int, i: int) -> list[Trajectory]:
        stage = self.cfg.stages[s]
        count = math.ceil(stage.tasks_per_iteration * self.cfg.rl.oversample)
        tasks = sample_tasks(self.train_tasks, count, seed=self.cfg.rl.seed, stage=s, iteration=i)
        return await self._collect(f"stage{s}_iter{i:04d}", tasks, stage.rollouts_per_task, stage, "train",
                                   meta={"stage": s, "iteration": i})  # fmt: skip

    async def evaluate(self, label: str, stage: StageConfig) -> float:
        """Mean judge score of ``rl.eval_samples`` rollouts per held-out task; recorded under ``label``."""
        if label in self.state.scores:
            return self.state.scores[label]
        t0 = time.perf_counter()
        trajs = await self._collect(f"eval_{label}", self.eval_tasks, self.cfg.rl.eval_samples, stage, "eval",
                                    temperature=self.cfg.rl.eval_temperature)  # fmt: skip
        counted = [t for t in trajs if not t.meta.get("reward_excluded")]
        score = float(np.mean([t.meta["reward"] for t in counted])) if counted else 0.0
        metrics = {"score": score, **{f"category/{k}": v for k, v in _category_means(trajs).items()}}
        metrics["turns"] = float(np.mean([t.meta["turns"] for t in trajs])) if trajs else 0.0
        self.logger.log(self.state.log_step, metrics, prefix=f"eval/{label}")
        self.logger.info(f"[bold green]held-out judge score ({label}): {score:.3f}[/bold green]")
        self.state.scores[label] = score
        self.state.wall_s[f"eval_{label}"] = time.perf_counter() - t0
        self.state.save(self.state_path)
        return score

    # ------------------------------------------------------------------ training
    def _train_command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command on every rank (rank 0 broadcasts it); returns rank 0's result."""
        cmd = broadcast_object(cmd)
        with cpu_compat.in_this_thread():  # rank 0 trains in a worker thread
            if cmd["op"] == "update":
                return self.policy.update(cmd["rows"])
            if cmd["op"] == "save":
                self.policy.save(self.save_dir, cmd["version"])
                return {}
            if cmd["op"] == "sft":
                return self._sft_warmup()
            if cmd["op"] == "reference":
                self.policy.freeze_reference(self.out / "reference")
            if cmd["op"] == "rollback":
                self.policy.load_weights(cmd["path"])
                return {"lr": self.policy.scale_lr(cmd["lr_factor"])}
        return {}

    def follow(self) -> None:
        """Non-zero ranks: execute rank 0's commands until it says stop."""
        while (cmd := broadcast_object(None))["op"] != "stop":
            self._train_command(cmd)

    def _sft_warmup(self) -> dict[str, Any]:
        from klong_megatron.config.sft import SFTConfig
        from klong_megatron.sft.trainer import SFTTrainer

        c = self.cfg
        data = c.data
        if c.rl.sft_expert_trajectories and c.tasks.source == "demo":
            data = dataclasses.replace(data, train_files=[str(self._write_expert_data())])
        sft_cfg = SFTConfig(model=c.model, data=data, trainer=c.rl.sft_warmup, logger=c.logger, cluster=c.cluster,
                            name=f"{c.name}-sft")  # fmt: skip
        sft = SFTTrainer(sft_cfg, self.out / "sft")
        summary = sft.run(self.logger)
        self.policy.load_weights(sft.save_dir)
        self.state.log_step = int(summary["state"]["step"])
        return summary

    def _write_expert_data(self) -> Path:
        from klong_megatron.data.trajectory import write_jsonl
        from klong_megatron.rl.tasks import demo_expert_trajectories

        path = self.out / "sft" / "expert_trajectories.jsonl"
        if self.rank0 and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            trajs = demo_expert_trajectories(self.cfg.tasks, self.cfg.rl.sft_expert_trajectories)
            write_jsonl(path, (t.to_json() for t in trajs))
        broadcast_object(None)  # every rank waits for the file
        return path

    def _update(self, trajs: list[Trajectory], s: int, i: int) -> dict[str, float]:
        a, c = self.cfg.algo, self.cfg
        rollouts = [JudgedRollout(t, float(t.meta["reward"]), str(t.meta["task"])) for t in trajs
                    if not t.meta.get("reward_excluded")]  # judge could not grade enough of it: no reward  # fmt: skip
        rollouts = self._select_groups(rollouts, c.stages[s].tasks_per_iteration)
        windows, wstats = build_rl_windows(
            rollouts, self.ctx, mode=a.advantage_mode, eps=a.advantage_eps, filter_zero_variance=a.filter_zero_variance,
            current_version=self.state.version, max_staleness=c.rl.max_staleness, loss_agg=a.loss_agg,
        )  # fmt: skip
        metrics = {f"windows/{k}": v for k, v in wstats.items()}
        if windows:
            tok = self.renderer.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            t0 = time.perf_counter()
            metrics |= self._train_command({"op": "update", "rows": pack_rows(windows, c.data.policy.max_len, pad)})
            metrics["train_s"] = time.perf_counter() - t0
        return metrics

    @staticmethod
    def _select_groups(rollouts: list[JudgedRollout], keep: int) -> list[JudgedRollout]:
        """Over-sampling: the first ``keep`` groups whose rewards differ, else the first ``keep`` groups."""
        groups: dict[str, list[JudgedRollout]] = {}
        for r in rollouts:
            groups.setdefault(r.group, []).append(r)
        varied = [g for g, rs in groups.items() if len({r.reward for r in rs}) > 1]
        chosen = (varied + [g for g in groups if g not in varied])[:keep]
        return [r for g in chosen for r in groups[g]]

    # ------------------------------------------------------------------ the run
    async def _run_stage(self, s: int) -> None:
        stage, st = self.cfg.stages[s], self.state
        pending: asyncio.Task | None = None
        for i in range(st.iteration, stage.iterations):
            t0 = time.perf_counter()
            trajs = await pending if pending is not None else await self._iteration_rollouts(s, i)
            pending = None
            if self.cfg.rl.partial_rollouts and i + 1 < stage.iterations:
                pending = asyncio.create_task(self._iteration_rollouts(s, i + 1))
            with self._no_interrupt():
                metrics = await asyncio.to_thread(self._update, trajs, s, i)
                st.version += 1
                await asyncio.to_thread(self._train_command, {"op": "save", "version": st.version})
                st.stage, st.iteration, st.log_step = (s, i + 1, st.log_step + 1)
                st.save(self.state_path)
            await self._push(st.version)
            metrics |= _rollout_metrics(trajs) | {"iteration_s": time.perf_counter() - t0, "stage": s}
            metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / metrics["iteration_s"]
            metrics |= {k: v for k, v in self.judge.queue.metrics().items() if "latency" in k or "wait" in k}
            pending = await self._check_health(s, i, metrics, pending)
            self.logger.log(st.log_step, metrics, prefix=f"rl/stage{s}")
            self.logger.log_table(st.log_step, f"rl/stage{s}/samples", list(_SAMPLE_COLUMNS), _sample_rows(trajs))
            if self.logger.run is not None:  # klong-view pages of the best and worst rollout, as a W&B artifact
                pages = write_best_and_worst(trajs, self.renderer, self.ctx, self.out / "view", f"stage{s}_iter{i:04d}")
                self.logger.log_files(f"rollouts-stage{s}-iter{i:04d}", pages, "klong-view")
            if self.cfg.rl.eval_every and (i + 1) % self.cfg.rl.eval_every == 0 and i + 1 < stage.iterations:
                await self.evaluate(f"stage{s}_iter{i + 1}", stage)
            self._add_wall(f"stage{s}", t0)
        t0 = time.perf_counter()
        score = await self.evaluate(f"stage{s}", stage)
        self._add_wall(f"stage{s}", t0)
        if score >= self.state.best.get("score", -1.0):
            self.state.best = {"score": score, "version": st.version, "label": f"stage{s}"}
            self._mark_best()
        st.stage, st.iteration = s + 1, 0
        st.save(self.state_path)

    async def _check_health(
        self, s: int, i: int, metrics: dict[str, float], pending: asyncio.Task | None
    ) -> asyncio.Task | None:
        """Collapse / stall detection after iteration ``i`` (``rl/health.py``) and the configured action.

        Returns the next iteration's rollouts still to use: none after a rollback (they came from the
        collapsed policy; cancelled and their store removed). Raises RLHealthError for ``stop``."""
        reasons = self.health.check(s, metrics)
        action = self.health.action(reasons)
        metrics |= {"health/tripped": float(bool(reasons)), "health/rollbacks": self.health.state.get("rollbacks", 0)}
        self.state.save(self.state_path)
        where, text = f"stage {s} iteration {i}", "; ".join(reasons)
        if action == "ok":
            return pending
        if action == "warn":
            self.logger.info(f"[bold red]RL health check failed ({where}): {text}[/bold red]")
            return pending
        if pending is not None:  # rollouts of the collapsed policy: cancelled, their store removed
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            (self.out / "rollouts" / f"stage{s}_iter{i + 1:04d}.jsonl").unlink(missing_ok=True)
        best = self.save_dir.parent / f"{self.save_dir.name}_best"
        if action == "stop" or not best.exists():
            done = self.health.state.get("rollbacks", 0)
            why = f" after {done} rollback(s)" if done else "" if action == "stop" else " (no best checkpoint)"
            raise RLHealthError(f"RL stopped{why} at {where}: {text}")
        cmd = {"op": "rollback", "path": str(best), "lr_factor": self.cfg.rl.health.lr_factor}
        with self._no_interrupt():
            lr = (await asyncio.to_thread(self._train_command, cmd))["lr"]
            self.state.version += 1
            self.health.after_rollback()
            await asyncio.to_thread(self._train_command, {"op": "save", "version": self.state.version})
            self.state.save(self.state_path)
        await self._push(self.state.version)
        label, version = self.state.best.get("label"), self.state.version
        self.logger.info(f"[bold red]RL health check failed ({where}): {text}. Rolled back to the best checkpoint "
                         f"({label}) as policy version {version}; learning rate now {lr:.3g}[/bold red]")  # fmt: skip
        metrics["health/rollbacks"] = self.health.state["rollbacks"]
        return None

    def _start_best(self) -> None:
        """Before RL: the starting policy (after SFT) is the first ``best`` (what a rollback returns to)."""
        st = self.state
        if st.best:
            return
        if ckpt.latest_step(self.save_dir) is None:
            self._train_command({"op": "save", "version": st.version})
        label = next((k for k in ("sft", "initial") if k in st.scores), "start")
        st.best = {"score": st.scores.get(label, -1.0), "version": st.version, "label": label}
        self._mark_best()
        st.save(self.state_path)

    def _add_wall(self, phase: str, t0: float) -> None:
        self.state.wall_s[phase] = self.state.wall_s.get(phase, 0.0) + time.perf_counter() - t0
        self.state.save(self.state_path)

    def _mark_best(self) -> None:
        """Copy the current checkpoint to ``checkpoints_best`` (the last one stays in ``checkpoints``)."""
        best = self.save_dir.parent / f"{self.save_dir.name}_best"
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(self.save_dir, best)

    def _on_signal(self, sig: int) -> None:
        """SIGTERM / SIGINT: stop now, except inside update -> save -> state (then right after it)."""
        self.stop_signal = sig
        self.logger.info(f"[yellow]{signal.Signals(sig).name}: stopping (judged rollouts are kept)[/yellow]")
        if not self._critical and self._main is not None:
            self._main.cancel()

    @contextlib.contextmanager
    def _no_interrupt(self) -> Iterator[None]:
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self.stop_signal is not None:
            raise asyncio.CancelledError

    async def _drive(self) -> dict[str, Any]:
        st, c = self.state, self.cfg
        self._main = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self._on_signal, sig)
        if ckpt.latest_step(self.save_dir) is not None:
            st.version = self.policy.load(self.save_dir)
            self.logger.info(f"resumed: stage {st.stage}, iteration {st.iteration}, policy version {st.version}")
        await self._start_services()
        try:
            first = c.stages[0]
            if c.rl.sft_warmup is not None and not st.sft_done:
                if c.rl.eval_initial:
                    await self.evaluate("initial", first)
                t0 = time.perf_counter()
                sft = self._train_command({"op": "sft"})  # main thread: the SFT trainer handles signals itself
                if sft.get("signal"):
                    self.stop_signal = sft["signal"]
                    raise asyncio.CancelledError
                st.sft_done = True
                st.wall_s["sft"] = st.wall_s.get("sft", 0.0) + time.perf_counter() - t0
                self._train_command({"op": "save", "version": 0})
                st.save(self.state_path)
                shutil.rmtree(self.out / "weights" / f"v{0:05d}", ignore_errors=True)
                await self._push(0)
                await self.evaluate("sft", first)
            elif c.rl.sft_warmup is None and c.rl.eval_initial:
                await self.evaluate("initial", first)
            if c.algo.kl_coef > 0:  # the policy RL starts from (after SFT), restored from disk on resume
                self._train_command({"op": "reference"})
            self._start_best()
            for s in range(st.stage, len(c.stages)):
                await self._run_stage(s)
        finally:
            await self._stop_services()
        return {"scores": dict(st.scores), "best": st.best, "version": st.version, "wall_s": dict(st.wall_s)}

    def run(self) -> dict[str, Any]:
        """Rank 0 drives the whole run; the others follow its training commands."""
        if not self.rank0:
            self.follow()
            return {}
        try:
            return asyncio.run(self._drive())
        except asyncio.CancelledError:
            if self.stop_signal is None:
                raise
            self.logger.info(f"stopped by {signal.Signals(self.stop_signal).name}; rerun to resume")
            return {"scores": dict(self.state.scores), "signal": int(self.stop_signal)}
        finally:
            broadcast_object({"op": "stop"})


_SAMPLE_COLUMNS = ("task", "reward", "turns", "wall_s", "finish", "transcript")


def _sample_rows(trajs: list[Trajectory], k: int = 4, chars: int = 6000) -> list[list[Any]]:
    """The best and worst rollouts of an iteration (up to ``k``) as W&B table rows; long transcripts
    keep their head and tail."""
    ranked = sorted(trajs, key=lambda t: t.meta["reward"])
    picked = list({t.id: t for t in ranked[len(ranked) - k // 2 :][::-1] + ranked[: k - k // 2]}.values())
    rows = []
    for t in picked:
        text = "\n\n".join(f"[{m.role}] {m.content}" + "".join(f"\n-> {c.name}({c.arguments})" for c in m.tool_calls)
                           for m in t.messages)  # fmt: skip
        if len(text) > chars:
            text = f"{text[: chars // 2]}\n[...]\n{text[-chars // 2 :]}"
        m = t.meta
        rows.append([m["task"], m["reward"], m["turns"], m["duration_s"], m.get("finish_reason"), text])
    return rows


def prepare_rubrics(tasks: list[RLTask], judge_cfg: Any) -> None:
    """Apply the judge's rubric transforms (code_only, zero_weight_categories, max_depth) to every task in
    place, as klong-judge and klong-eval do (``judge.factory.prepare_rubric``); paper tasks grade with it too."""
    for t in tasks:
        t.rubric = prepare_rubric(t.rubric, judge_cfg)
        if t.paper_task is not None:
            t.paper_task.rubric = t.rubric


def _rollout_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Reward, judge categories, turns, wall time, timeouts and tokens of one iteration's rollouts."""
    if not trajs:
        return {}
    rewards = np.array([t.meta["reward"] for t in trajs])
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "turns": float(np.mean([t.meta["turns"] for t in trajs])),
        "rollout_wall_s": float(np.mean([t.meta["duration_s"] for t in trajs])),
        "timeout_frac": float(np.mean([bool(t.meta.get("timed_out")) for t in trajs])),
        "tokens": float(np.sum([t.meta["tokens"] for t in trajs])),
        "submitted_frac": float(np.mean([t.meta.get("finish_reason") == "submitted" for t in trajs])),
        "judge/excluded": float(sum(bool(t.meta.get("reward_excluded")) for t in trajs)),
        "judge/invalid_frac": float(np.mean([t.meta.get("judge_invalid_frac", 0.0) for t in trajs])),
        "blacklist_flagged": float(sum(bool(t.meta.get("blacklist_flagged")) for t in trajs)),
    }
    out |= {f"judge/{k}": v for k, v in _category_means(trajs).items()}
    for k in ("calls", "prompt_tokens", "completion_tokens"):  # judge cost of this iteration's rollouts
        out[f"judge/{k}"] = float(sum(t.meta.get("judge_token_usage", {}).get(k, 0) for t in trajs))
    return out


def _category_means(trajs: list[Trajectory]) -> dict[str, float]:
    """Mean judge score per rubric category over the rollouts that have one."""
    cats: dict[str, list[float]] = {}
    for t in trajs:
        for k, v in t.meta.get("judge_per_category", {}).items():
            cats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in cats.items()}

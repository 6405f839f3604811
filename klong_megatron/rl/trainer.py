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
With ``rl.refill.enabled`` the rollout service (rollout/service.py, in this process or in
``klong-rollout-service``) keeps ``concurrency`` rollouts running and an update takes the first complete
groups it logged (rl/batches.py ``RefillBatches``), with the same staleness rule.
Evaluations (held-out tasks, eval judge priority) run before training, after the SFT warm-up and after
every stage (and every ``rl.eval_every`` iterations); ``best`` records the best-scoring checkpoint.

Resume: the state file names the next (stage, iteration); the checkpoint holds model, optimizer and
RNG; rollouts already stored for an iteration (with their rewards) are reused, never re-run or
re-judged. Only global rank 0 runs rollouts and the judge; every rank trains (rows are broadcast).

Where the parts live: this file is the run loop (``_run_stage`` is one iteration's dataflow);
``rl/rollouts.py`` builds and runs judged rollouts; ``rl/services.py`` starts and stops the judge, sandbox
pool, rollout servers and weight sync; ``rl/commands.py`` is what every rank executes; ``rl/signals.py``
the SIGTERM / SIGINT rule; ``rl/state.py`` the resume file; ``rl/metrics.py`` the logged figures.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from klong_megatron.config.rl import RLConfig, StageConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.judge.factory import prepare_rubric
from klong_megatron.logging import MetricsLogger
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.rl.batches import IterationBatches, RefillBatches
from klong_megatron.rl.commands import TrainCommands
from klong_megatron.rl.health import HealthMonitor, RLHealthError
from klong_megatron.rl.metrics import SAMPLE_COLUMNS, category_means, rollout_metrics, sample_rows
from klong_megatron.rl.policy import Policy, broadcast_object
from klong_megatron.rl.rollouts import RLRollouts
from klong_megatron.rl.services import RLServices
from klong_megatron.rl.signals import StopOnSignal
from klong_megatron.rl.state import RLState
from klong_megatron.rl.tasks import RLTask, build_task_sets
from klong_megatron.rl.windows import JudgedRollout, build_rl_windows, pack_rows
from klong_megatron.view.page import write_best_and_worst

__all__ = ["RLState", "RLTrainer", "prepare_rubrics"]


class RLTrainer:
    """One progressive-RL run in ``output_dir`` (every rank constructs one; rank 0 drives)."""

    def __init__(self, cfg: RLConfig, output_dir: str | Path, logger: MetricsLogger) -> None:
        import torch.distributed as dist

        from klong_megatron.data.dataset import load_tokenizer

        self.cfg = cfg
        self.out = Path(output_dir)
        self.logger = logger
        self.policy = Policy(cfg)
        self.rank0 = dist.get_rank() == 0
        self.renderer = Renderer(load_tokenizer(cfg.data.tokenizer))
        self.ctx = ContextPolicy.from_renderer(cfg.data.policy, self.renderer)
        self.train_tasks, self.eval_tasks = build_task_sets(cfg.tasks)
        prepare_rubrics(self.train_tasks + self.eval_tasks, cfg.judge)
        self.save_dir = Path(cfg.trainer.save_dir or self.out / "checkpoints")
        self.state_path = self.out / "rl_state.json"
        self.state = RLState.load(self.state_path)
        self.health = HealthMonitor(cfg.rl.health, self.state.health)
        self.commands = TrainCommands(cfg, self.out, self.policy, self.save_dir, logger)
        self.services = RLServices(cfg, self.out, self.policy, self.renderer.tokenizer)
        self.rollouts = RLRollouts(cfg, self.out, self.renderer, self.ctx, self.train_tasks + self.eval_tasks,
                                   self.services, logger)  # fmt: skip
        kind = RefillBatches if cfg.rl.refill.enabled else IterationBatches
        self.batches = kind(cfg, self.out, self.rollouts, self.train_tasks, logger)
        self.stop = StopOnSignal(logger.info)

    async def evaluate(self, label: str, stage: StageConfig) -> float:
        """Mean judge score of ``rl.eval_samples`` rollouts per held-out task; recorded under ``label``."""
        if label in self.state.scores:
            return self.state.scores[label]
        t0 = time.perf_counter()
        trajs = await self.rollouts.collect(f"eval_{label}", self.eval_tasks, self.cfg.rl.eval_samples, stage, "eval",
                                            temperature=self.cfg.rl.eval_temperature)  # fmt: skip
        counted = [t for t in trajs if not t.meta.get("reward_excluded")]
        score = float(np.mean([t.meta["reward"] for t in counted])) if counted else 0.0
        metrics = {"score": score, **{f"category/{k}": v for k, v in category_means(trajs).items()}}
        metrics["turns"] = float(np.mean([t.meta["turns"] for t in trajs])) if trajs else 0.0
        self.logger.log(self.state.log_step, metrics, prefix=f"eval/{label}")
        self.logger.info(f"[bold green]held-out judge score ({label}): {score:.3f}[/bold green]")
        self.state.scores[label] = score
        self.state.wall_s[f"eval_{label}"] = time.perf_counter() - t0
        self.state.save(self.state_path)
        return score

    def _update(self, trajs: list[Trajectory], s: int, i: int) -> dict[str, float]:
        a, c = self.cfg.algo, self.cfg
        rollouts = [JudgedRollout(t, float(t.meta["reward"]), str(t.meta.get("group") or t.meta["task"])) for t in trajs
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
            metrics |= self.commands({"op": "update", "rows": pack_rows(windows, c.data.policy.max_len, pad)})
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
        for i in range(st.iteration, stage.iterations):
            t0 = time.perf_counter()
            trajs = await self.batches.take(s, i, st)  # judged rollouts (rl/batches.py: per iteration or refill)
            with self.stop.critical():
                metrics = await asyncio.to_thread(self._update, trajs, s, i)
                st.version += 1
                await asyncio.to_thread(self.commands, {"op": "save", "version": st.version})
                self.batches.commit(st)
                st.stage, st.iteration, st.log_step = (s, i + 1, st.log_step + 1)
                st.save(self.state_path)
            await self.batches.released(st)
            await self.services.push(st.version)
            metrics |= rollout_metrics(trajs) | {"iteration_s": time.perf_counter() - t0, "stage": s}
            metrics |= self.batches.metrics  # refill: wait for complete groups, skipped / buffered groups
            metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / metrics["iteration_s"]
            metrics |= {k: v for k, v in self.services.judge.queue.metrics().items() if "latency" in k or "wait" in k}
            await self._check_health(s, i, metrics)
            self.logger.log(st.log_step, metrics, prefix=f"rl/stage{s}")
            self.logger.log_table(st.log_step, f"rl/stage{s}/samples", list(SAMPLE_COLUMNS), sample_rows(trajs))
            if self.logger.run is not None:  # klong-view pages of the best and worst rollout, as a W&B artifact
                pages = write_best_and_worst(trajs, self.renderer, self.ctx, self.out / "view", f"stage{s}_iter{i:04d}")
                self.logger.log_files(f"rollouts-stage{s}-iter{i:04d}", pages, "klong-view")
            if self.cfg.rl.eval_every and (i + 1) % self.cfg.rl.eval_every == 0 and i + 1 < stage.iterations:
                await self.evaluate(f"stage{s}_iter{i + 1}", stage)
            self._add_wall(f"stage{s}", t0)
        await self.batches.end_stage(s)
        t0 = time.perf_counter()
        score = await self.evaluate(f"stage{s}", stage)
        self._add_wall(f"stage{s}", t0)
        reasons = self.health.check_eval(f"stage{s}", score, self.state.best.get("score"))
        await self._act(reasons, s, stage.iterations - 1, f"stage {s} evaluation", {})
        if score >= self.state.best.get("score", -1.0):
            self.state.best = {"score": score, "version": st.version, "label": f"stage{s}"}
            self._mark_best()
        st.stage, st.iteration = s + 1, 0
        st.save(self.state_path)

    async def _check_health(self, s: int, i: int, metrics: dict[str, float]) -> None:
        """Collapse / stall detection after iteration ``i`` (``rl/health.py``) and the configured action.

        After a rollback the rollouts already made for later updates are discarded (they came from the
        collapsed policy). Raises RLHealthError for ``stop``."""
        reasons = self.health.check(s, metrics)
        metrics |= {"health/tripped": float(bool(reasons)), "health/rollbacks": self.health.state.get("rollbacks", 0)}
        self.state.save(self.state_path)
        await self._act(reasons, s, i, f"stage {s} iteration {i}", metrics)

    async def _act(self, reasons: list[str], s: int, i: int, where: str, metrics: dict[str, float]) -> None:
        """``rl.health.action`` on ``reasons`` found after iteration ``i`` of stage ``s`` (none: nothing)."""
        action, text = self.health.action(reasons), "; ".join(reasons)
        if action == "ok":
            return
        if action == "warn":
            self.logger.info(f"[bold red]RL health check failed ({where}): {text}[/bold red]")
            return
        await self.batches.discard(s, i, self.state)
        best = self.save_dir.parent / f"{self.save_dir.name}_best"
        if action == "stop" or not best.exists():
            done = self.health.state.get("rollbacks", 0)
            why = f" after {done} rollback(s)" if done else "" if action == "stop" else " (no best checkpoint)"
            raise RLHealthError(f"RL stopped{why} at {where}: {text}")
        cmd = {"op": "rollback", "path": str(best), "lr_factor": self.cfg.rl.health.lr_factor}
        with self.stop.critical():
            lr = (await asyncio.to_thread(self.commands, cmd))["lr"]
            self.state.version += 1
            self.health.after_rollback()
            await asyncio.to_thread(self.commands, {"op": "save", "version": self.state.version})
            self.state.save(self.state_path)
        await self.services.push(self.state.version)
        label, version = self.state.best.get("label"), self.state.version
        self.logger.info(f"[bold red]RL health check failed ({where}): {text}. Rolled back to the best checkpoint "
                         f"({label}) as policy version {version}; learning rate now {lr:.3g}[/bold red]")  # fmt: skip
        metrics["health/rollbacks"] = self.health.state["rollbacks"]

    def _start_best(self) -> None:
        """Before RL: the starting policy (after SFT) is the first ``best`` (what a rollback returns to)."""
        st = self.state
        if st.best:
            return
        if ckpt.latest_step(self.save_dir) is None:
            self.commands({"op": "save", "version": st.version})
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

    async def _drive(self) -> dict[str, Any]:
        st, c = self.state, self.cfg
        self.stop.install()
        if ckpt.latest_step(self.save_dir) is not None:
            st.version = self.policy.load(self.save_dir)
            self.logger.info(f"resumed: stage {st.stage}, iteration {st.iteration}, policy version {st.version}")
        await self.services.start(st.version)
        try:
            await self.batches.start()
            first = c.stages[0]
            if c.rl.sft_warmup is not None and not st.sft_done:
                if c.rl.eval_initial:
                    await self.evaluate("initial", first)
                t0 = time.perf_counter()
                sft = self.commands({"op": "sft"})  # main thread: the SFT trainer handles signals itself
                st.log_step = self.commands.sft_log_step
                if sft.get("signal"):
                    self.stop.stop_now(sft["signal"])
                st.sft_done = True
                st.wall_s["sft"] = st.wall_s.get("sft", 0.0) + time.perf_counter() - t0
                self.commands({"op": "save", "version": 0})
                st.save(self.state_path)
                shutil.rmtree(self.out / "weights" / f"v{0:05d}", ignore_errors=True)
                await self.services.push(0)
                await self.evaluate("sft", first)
            elif c.rl.sft_warmup is None and c.rl.eval_initial:
                await self.evaluate("initial", first)
            if c.algo.kl_coef > 0:  # the policy RL starts from (after SFT), restored from disk on resume
                self.commands({"op": "reference"})
            self._start_best()
            for s in range(st.stage, len(c.stages)):
                await self._run_stage(s)
        finally:
            await self.batches.close()
            await self.services.stop()
        return {"scores": dict(st.scores), "best": st.best, "version": st.version, "wall_s": dict(st.wall_s)}

    def run(self) -> dict[str, Any]:
        """Rank 0 drives the whole run; the others follow its training commands."""
        if not self.rank0:
            self.commands.follow()
            return {}
        try:
            return asyncio.run(self._drive())
        except asyncio.CancelledError:
            if self.stop.signal is None:
                raise
            self.logger.info(f"stopped by {signal.Signals(self.stop.signal).name}; rerun to resume")
            return {"scores": dict(self.state.scores), "signal": int(self.stop.signal)}
        finally:
            broadcast_object({"op": "stop"})


def prepare_rubrics(tasks: list[RLTask], judge_cfg: Any) -> None:
    """Apply the judge's rubric transforms (code_only, zero_weight_categories, max_depth) to every task in
    place, as klong-judge and klong-eval do (``judge.factory.prepare_rubric``); paper tasks grade with it too."""
    for t in tasks:
        t.rubric = prepare_rubric(t.rubric, judge_cfg)
        if t.paper_task is not None:
            t.paper_task.rubric = t.rubric

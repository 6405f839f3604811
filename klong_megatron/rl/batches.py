"""Where an update's judged rollouts come from: one batch per iteration, or continuous refill.

``IterationBatches`` (``rl.refill.enabled=false``): iteration i of stage s samples its tasks (seeded by s,
i) and runs ``rollouts_per_task`` rollouts of each as one batch (``rollouts/stage<s>_iter<i>.jsonl``);
with ``rl.partial_rollouts`` the next batch starts when this one is handed to training.

``RefillBatches`` (``rl.refill.enabled=true``): a rollout service (``rollout/service.py``; in this
process, or ``klong-rollout-service`` at ``rl.refill.service_url``) keeps ``rollout.concurrency``
rollouts running over ``output_dir/refill`` (a rollout's slot is freed when its generation ends; the
judge grades it beside the slots); group k of stage s is task k mod c of the tasks sampled for
round k // c (c = ceil(tasks_per_iteration * oversample)), ``rollouts_per_task`` rollouts. An update
takes the first c complete groups of the group log after ``RLState.groups_taken`` (stage s only with
``stage_switch=cancel``; stages <= s with ``finish``, so groups started before a switch are trained in
the next stage), and the new ``groups_taken`` is saved with the update's checkpoint: a restarted trainer
takes what the service finished meanwhile, and never a group twice.

Both give the trainer the same four calls: ``take`` (wait for the batch), ``commit`` (inside the update's
critical section), ``released`` (after it), ``end_stage``; ``discard`` drops buffered rollouts after a
rollback to the best checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import RLConfig
from klong_megatron.data.trajectory import Trajectory, parse_trajectory
from klong_megatron.rl.rollouts import RLRollouts
from klong_megatron.rl.state import RLState
from klong_megatron.rl.tasks import RLTask, sample_tasks
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.rollout.service import RolloutService, read_group_log
from klong_megatron.rollout.store import read_at


class IterationBatches:
    """One batch of rollouts per iteration; the next prefetched with ``rl.partial_rollouts``."""

    def __init__(self, cfg: RLConfig, out: Path, rollouts: RLRollouts, train_tasks: list[RLTask], logger: Any) -> None:
        self.cfg, self.out, self.rollouts, self.train_tasks = cfg, out, rollouts, train_tasks
        self._pending: asyncio.Task | None = None
        self.metrics: dict[str, float] = {}

    async def start(self) -> None:
        return None

    async def take(self, s: int, i: int, state: RLState) -> list[Trajectory]:
        """Iteration ``i``'s batch (prefetched or run now); starts the next one with partial rollouts."""
        run = self._pending if self._pending is not None else self.rollouts.iteration(s, i, self.train_tasks)
        trajs = await run
        self._pending = None
        if self.cfg.rl.partial_rollouts and i + 1 < self.cfg.stages[s].iterations:
            self._pending = asyncio.create_task(self.rollouts.iteration(s, i + 1, self.train_tasks))
        return trajs

    def commit(self, state: RLState) -> None:
        return None

    async def released(self, state: RLState) -> None:
        return None

    async def end_stage(self, s: int) -> None:
        return None

    async def discard(self, s: int, i: int, state: RLState) -> None:
        """Rollback after iteration ``i``: the prefetched rollouts of the collapsed policy are cancelled and
        their store removed."""
        await self.close()
        (self.out / "rollouts" / f"stage{s}_iter{i + 1:04d}.jsonl").unlink(missing_ok=True)

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending
            self._pending = None


def groups_per_update(cfg: RLConfig, s: int, num_tasks: int) -> int:
    """c: the groups an update of stage ``s`` takes (and the tasks sampled per round)."""
    return min(math.ceil(cfg.stages[s].tasks_per_iteration * cfg.rl.oversample), num_tasks)


def build_rl_service(cfg: RLConfig, out: Path, rollouts: RLRollouts, train_tasks: list[RLTask]) -> RolloutService:
    """The rollout service of an RL run over ``out/refill`` (in the trainer or ``klong-rollout-service``)."""

    def groups_of(s: int, index: int) -> list[RolloutTask]:
        stage, c = cfg.stages[s], groups_per_update(cfg, s, len(train_tasks))
        rnd, pos = divmod(index, c)
        task = sample_tasks(train_tasks, c, seed=cfg.rl.seed, stage=s, iteration=rnd)[pos]
        name = f"stage{s}_group{index:05d}/{task.task_id}"
        meta = {"task": task.task_id, "stage": s, "iteration": rnd, "group": name}
        return [RolloutTask(name, rollouts.prompt(task, stage), k, dict(meta)) for k in range(stage.rollouts_per_task)]

    phases: dict[int, Any] = {}  # stage -> (generate, grade): one agent loop per stage

    def phase(s: int, k: int) -> Any:
        if s not in phases:
            phases[s] = rollouts.phases(cfg.stages[s], "train")
        return phases[s][k]

    r = cfg.rl.refill
    need = max(groups_per_update(cfg, s, len(train_tasks)) for s in range(len(cfg.stages)))
    fill = math.ceil(cfg.rollout.concurrency / min(st.rollouts_per_task for st in cfg.stages))
    return RolloutService(out / "refill", groups_of, lambda s: phase(s, 0), grade_fn_of=lambda s: phase(s, 1),
                          concurrency=cfg.rollout.concurrency, max_ahead=r.max_ahead or fill + 2 * need,
                          stage_switch=r.stage_switch)  # fmt: skip


class RefillBatches:
    """Updates take complete groups from a rollout service's group log (continuous refill)."""

    def __init__(self, cfg: RLConfig, out: Path, rollouts: RLRollouts, train_tasks: list[RLTask], logger: Any) -> None:
        self.cfg, self.out, self.rollouts, self.train_tasks, self.logger = cfg, out, rollouts, train_tasks, logger
        self.dir = out / "refill"
        self.service: Any = None
        self._next_taken: int | None = None
        self.metrics: dict[str, float] = {}
        """of the last take: seconds waited for complete groups, log entries skipped, complete groups left"""

    async def start(self) -> None:
        from klong_megatron.rollout.service_http import ServiceClient

        url = self.cfg.rl.refill.service_url
        if url:
            self.service = ServiceClient(url)
        else:
            self.service = build_rl_service(self.cfg, self.out, self.rollouts, self.train_tasks)
            await self.service.start()

    async def take(self, s: int, i: int, state: RLState) -> list[Trajectory]:
        """The first c complete groups after ``state.groups_taken`` (waits for them)."""
        c = groups_per_update(self.cfg, s, len(self.train_tasks))
        accept = (lambda e: e == s) if self.cfg.rl.refill.stage_switch == "cancel" else (lambda e: e <= s)
        polls, t0 = 0, time.perf_counter()
        while True:
            if polls % 30 == 0:  # again now and then: a restarted service learns where the trainer is
                status = await self.service.control(stage=s, taken=state.groups_taken)
                if status.get("errors") and not status.get("workers"):
                    raise RuntimeError(f"the rollout service has no running worker: {status['errors']}")
            chosen, used = [], 0
            for entry in read_group_log(self.dir / "groups.jsonl", state.groups_taken):
                used += 1
                if entry["status"] == "complete" and entry["ids"] and accept(entry["stage"]):
                    chosen.append(entry)
                    if len(chosen) == c:
                        break
            if len(chosen) == c:
                break
            polls += 1
            await asyncio.sleep(self.cfg.rl.refill.poll_s)
        self._next_taken = state.groups_taken + used
        left = read_group_log(self.dir / "groups.jsonl", self._next_taken)
        self.metrics = {"refill/wait_s": time.perf_counter() - t0, "refill/skipped": float(used - len(chosen)),
                        "refill/buffered": float(sum(e["status"] == "complete" for e in left))}  # fmt: skip
        path = self.dir / "rollouts.jsonl"
        records = await asyncio.to_thread(read_at, path, [o for e in chosen for o in e["offsets"]])
        return [parse_trajectory(r, f"{path}:{r.get('id')}") for r in records]

    def commit(self, state: RLState) -> None:
        """Inside the update's critical section: the taken groups are consumed with this update."""
        assert self._next_taken is not None, "commit without take"
        state.groups_taken, self._next_taken = self._next_taken, None

    async def released(self, state: RLState) -> None:
        """After the update was saved: the service may start groups for the freed buffer room."""
        await self.service.control(taken=state.groups_taken)

    async def end_stage(self, s: int) -> None:
        """Before the stage's evaluation: the service starts the next stage's groups."""
        if s + 1 < len(self.cfg.stages):
            await self.service.control(stage=s + 1)

    async def discard(self, s: int, i: int, state: RLState) -> None:
        """Rollback: every complete group buffered so far came from the collapsed policy and is skipped."""
        state.groups_taken = max(state.groups_taken, len(read_group_log(self.dir / "groups.jsonl")))
        await self.service.control(taken=state.groups_taken)

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()

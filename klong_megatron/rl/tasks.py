"""RL tasks: the initial conversation, the files the sandbox starts with, and the rubric that grades it.

Two sources (``tasks.source``):

- ``demo``: generated integer-transform papers (``klong_megatron.data.demo_tasks``) whose rubric
  leaves carry ``check`` commands; training and held-out tasks come from disjoint seed ranges, so
  evaluation never sees a training paper.
- ``dir``: PaperBench task folders (``klong_megatron.tasks``: validated, errors name the folder and
  file). Such a task runs in its own sandbox with the paper read-only at ``/paper`` and the prompt of
  ``tasks/workspace.py`` (stating the stage's time budget); its blacklist reaches the ToolSet and the
  monitor, and its submission goes through the reproduction step before the judge (eval/grading.py).

A demo task's sandbox work dir holds its files; the agent writes its submission to ``submission/``
under the work dir, which is what the judge grades.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import TasksConfig
from klong_megatron.data.demo_tasks import expert_trajectory, make_task
from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.judge.rubric import TaskNode, rubric_from_dict
from klong_megatron.tasks.paperbench import PaperTask, find_task_dirs, load_paper_task
from klong_megatron.tasks.workspace import paper_messages

SUBMISSION_DIR = "submission"
_TRAIN_SEED, _EVAL_SEED = 10_000, 90_000


@dataclass
class RLTask:
    """One task: prompt messages, starting files (relative to the work dir), rubric, paper text."""

    task_id: str
    messages: list[Message]
    files: dict[str, str]
    rubric: TaskNode
    paper: str = ""
    addendum: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    paper_task: PaperTask | None = None
    """source=dir: the task folder (its own sandbox, blacklist, reproduction step)."""

    def prompt(self, time_budget_s: float, *, workdir: str, reproduce_timeout_s: float, gpus: int = 0) -> list[Message]:
        """The initial messages of a rollout with ``time_budget_s`` (paper tasks state it; demo tasks don't)."""
        if self.paper_task is None:
            return self.messages
        return paper_messages(self.paper_task, workdir=workdir, time_budget_s=time_budget_s,
                              reproduce_timeout_s=reproduce_timeout_s, gpus=gpus)  # fmt: skip


def _demo_seed(cfg: TasksConfig, split: int, i: int) -> int:
    return cfg.seed * 1_000_000 + split + i


def _demo_task(seed: int, cfg: TasksConfig) -> RLTask:
    t = make_task(seed, cfg.demo_functions, cfg.demo_forms)
    rubric = rubric_from_dict(t.rubric(), f"demo task {t.task_id}")
    return RLTask(t.task_id, t.prompt(), t.files(), rubric, paper=t.paper)


def load_task_dir(path: str | Path) -> RLTask:
    """A PaperBench task folder -> RLTask (FileNotFoundError / ValueError naming the folder and file).

    ``messages`` holds the prompt for a 2-hour budget; the trainer asks :meth:`RLTask.prompt` per stage."""
    task = load_paper_task(path)
    messages = paper_messages(task, time_budget_s=7200.0, reproduce_timeout_s=36_000.0)
    meta = {"blacklist": list(task.blacklist), "paper_id": task.paper_id}
    return RLTask(task.task_id, messages, {}, task.rubric, task.paper, task.judge_addendum_text, meta, task)


def build_task_sets(cfg: TasksConfig) -> tuple[list[RLTask], list[RLTask]]:
    """(training tasks, held-out tasks) for ``cfg``; deterministic."""
    if cfg.source == "demo":
        train = [_demo_task(_demo_seed(cfg, _TRAIN_SEED, i), cfg) for i in range(cfg.num_train)]
        held = [_demo_task(_demo_seed(cfg, _EVAL_SEED, i), cfg) for i in range(cfg.num_eval)]
        return train, held
    tasks = [load_task_dir(d) for d in find_task_dirs(cfg.dir or "")]
    if cfg.eval_dir:
        return tasks, [load_task_dir(d) for d in find_task_dirs(cfg.eval_dir)]
    if len(tasks) <= cfg.num_eval:
        raise ValueError(f"tasks.dir has {len(tasks)} tasks: too few to hold out tasks.num_eval={cfg.num_eval}")
    return tasks[cfg.num_eval :], tasks[: cfg.num_eval]


def demo_expert_trajectories(cfg: TasksConfig, count: int) -> Iterator[Trajectory]:
    """Scripted-expert solutions of the first ``count`` demo training tasks (the SFT warm-up data;
    ``count`` may exceed ``num_train``: the seeds go on; ``tasks.demo_skip_rate`` of them skip the
    reproduction step). Held-out tasks are never used."""
    for i in range(count):
        seed = _demo_seed(cfg, _TRAIN_SEED, i)
        task = make_task(seed, cfg.demo_functions, cfg.demo_forms)
        yield expert_trajectory(task, seed=seed, skip_rate=cfg.demo_skip_rate)


def sample_tasks(tasks: list[RLTask], count: int, *, seed: int, stage: int, iteration: int) -> list[RLTask]:
    """``min(count, len(tasks))`` distinct tasks for one iteration, a pure function of (seed, stage,
    iteration): a resumed run samples the same tasks again."""
    rng = random.Random(f"{seed}:{stage}:{iteration}")
    return rng.sample(tasks, min(count, len(tasks)))

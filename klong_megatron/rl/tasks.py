"""RL tasks: the initial conversation, the files the sandbox starts with, and the rubric that grades it.

Two sources (``tasks.source``):

- ``demo``: generated integer-transform papers (``klong_megatron.data.demo_tasks``) whose rubric
  leaves carry ``check`` commands; training and held-out tasks come from disjoint seed ranges, so
  evaluation never sees a training paper.
- ``dir``: PaperBench-style folders, one per task: ``paper.md`` and ``rubric.json`` (required),
  ``addendum.md`` and ``blacklist.txt`` (optional). Errors name the folder and the missing file.

A task's sandbox work dir holds its files; the agent writes its submission to ``submission/``
under the work dir, which is what the judge grades.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.config.rl import TasksConfig
from klong_megatron.data.demo_tasks import SYSTEM_PROMPT, expert_trajectory, make_task
from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.judge.rubric import TaskNode, load_rubric, rubric_from_dict

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


def _demo_seed(cfg: TasksConfig, split: int, i: int) -> int:
    return cfg.seed * 1_000_000 + split + i


def _demo_task(seed: int, cfg: TasksConfig) -> RLTask:
    t = make_task(seed, cfg.demo_functions, cfg.demo_forms)
    rubric = rubric_from_dict(t.rubric(), f"demo task {t.task_id}")
    return RLTask(t.task_id, t.prompt(), t.files(), rubric, paper=t.paper)


def load_task_dir(path: str | Path) -> RLTask:
    """A PaperBench-style task folder -> RLTask (raises FileNotFoundError naming the missing file)."""
    root = Path(path)
    for name in ("paper.md", "rubric.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"task folder {root}: missing {name}")
    paper = (root / "paper.md").read_text()
    addendum = (root / "addendum.md").read_text() if (root / "addendum.md").is_file() else ""
    files = {"paper.md": paper} | ({"addendum.md": addendum} if addendum else {})
    extra = " and its addendum.md" if addendum else ""
    text = (
        f"Task {root.name}: reproduce the paper in paper.md (work directory){extra}. "
        f"Write your code and a reproduce.sh under {SUBMISSION_DIR}/; call submit when done."
    )
    meta = {"blacklist": str(root / "blacklist.txt")} if (root / "blacklist.txt").is_file() else {}
    messages = [Message("system", SYSTEM_PROMPT), Message("user", text)]
    return RLTask(root.name, messages, files, load_rubric(root / "rubric.json"), paper, addendum, meta)


def _task_dirs(path: str) -> list[Path]:
    dirs = sorted(p for p in Path(path).iterdir() if p.is_dir())
    if not dirs:
        raise FileNotFoundError(f"tasks.dir={path!r} holds no task folders")
    return dirs


def build_task_sets(cfg: TasksConfig) -> tuple[list[RLTask], list[RLTask]]:
    """(training tasks, held-out tasks) for ``cfg``; deterministic."""
    if cfg.source == "demo":
        train = [_demo_task(_demo_seed(cfg, _TRAIN_SEED, i), cfg) for i in range(cfg.num_train)]
        held = [_demo_task(_demo_seed(cfg, _EVAL_SEED, i), cfg) for i in range(cfg.num_eval)]
        return train, held
    tasks = [load_task_dir(d) for d in _task_dirs(cfg.dir or "")]
    if cfg.eval_dir:
        return tasks, [load_task_dir(d) for d in _task_dirs(cfg.eval_dir)]
    if len(tasks) <= cfg.num_eval:
        raise ValueError(f"tasks.dir has {len(tasks)} tasks: too few to hold out tasks.num_eval={cfg.num_eval}")
    return tasks[cfg.num_eval :], tasks[: cfg.num_eval]


def demo_expert_trajectories(cfg: TasksConfig, count: int) -> Iterator[Trajectory]:
    """Scripted-expert solutions of the first ``count`` demo training tasks (the SFT warm-up data;
    ``count`` may exceed ``num_train``: the seeds go on). Held-out tasks are never used."""
    for i in range(count):
        seed = _demo_seed(cfg, _TRAIN_SEED, i)
        yield expert_trajectory(make_task(seed, cfg.demo_functions, cfg.demo_forms), seed=seed)


def sample_tasks(tasks: list[RLTask], count: int, *, seed: int, stage: int, iteration: int) -> list[RLTask]:
    """``min(count, len(tasks))`` distinct tasks for one iteration, a pure function of (seed, stage,
    iteration): a resumed run samples the same tasks again."""
    rng = random.Random(f"{seed}:{stage}:{iteration}")
    return rng.sample(tasks, min(count, len(tasks)))

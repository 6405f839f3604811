"""The judge: grades a submission directory against a rubric and returns the reward.

Dataflow: ``await judge.grade(submission_dir, rubric, priority)`` -> job in the :class:`JudgeQueue`
(eval jobs first, persisted) -> :meth:`Judge.run` -> each leaf routed to a grader (leaves with a
``check`` -> check grader when configured, the others -> LLM grader) -> cached grades reused, the rest
graded concurrently -> valid grades cached -> :func:`aggregate` -> :class:`JudgeResult`, also written
as JSON (total, per category, per leaf) to ``out_path`` (default: ``<submission_dir>.grade.json``).

Invalid leaves (grading failed after retries, or no grader for the leaf) count 0 in the score and are
listed in ``invalid``; callers decide whether such a reward is usable (``JudgeResult.complete``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.judge.base import GradingTask, LeafGrade, LeafGrader
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.queue import Job, JudgeQueue
from klong_megatron.judge.rubric import (
    TaskNode,
    aggregate,
    category_scores,
    load_rubric,
    rubric_from_dict,
    rubric_to_dict,
)
from klong_megatron.judge.submission import Submission


@dataclass
class JudgeResult:
    """Score in [0, 1], per-category scores, per-leaf grades, and the leaves that could not be graded."""

    score: float
    per_category: dict[str, float]
    leaves: dict[str, LeafGrade]
    invalid: list[str]
    rubric_id: str
    submission: str
    submission_hash: str
    duration_s: float
    node_scores: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.invalid

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["leaves"] = {k: g.to_dict() for k, g in self.leaves.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeResult:
        return cls(**{**d, "leaves": {k: LeafGrade.from_dict(g) for k, g in d["leaves"].items()}})


class Judge:
    """Grades submissions; use as ``async with Judge(...) as judge: await judge.grade(...)``."""

    def __init__(
        self,
        *,
        llm: LeafGrader | None = None,
        check: LeafGrader | None = None,
        cache: GradeCache | None = None,
        state_dir: str | Path | None = None,
        max_concurrent_jobs: int = 4,
        max_job_attempts: int = 3,
    ) -> None:
        if llm is None and check is None:
            raise ValueError("Judge needs at least one grader (llm or check)")
        self.llm, self.check = llm, check
        self.cache = cache if cache is not None else GradeCache()
        self.queue = JudgeQueue(
            self._run_job,
            state_dir=state_dir,
            max_concurrent_jobs=max_concurrent_jobs,
            max_job_attempts=max_job_attempts,
        )

    async def __aenter__(self) -> Judge:
        await self.queue.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.queue.close()

    async def grade(
        self,
        submission_dir: str | Path,
        rubric: TaskNode | str | Path,
        *,
        priority: str = "train",
        paper: str = "",
        addendum: str = "",
        out_path: str | Path | None = None,
    ) -> JudgeResult:
        """Queue a grading job and wait for it. ``priority``: "eval" jobs are served before "train" jobs."""
        job = self.job(submission_dir, rubric, priority=priority, paper=paper, addendum=addendum, out_path=out_path)
        return JudgeResult.from_dict(await self.queue.wait(self.queue.submit(job)))

    @staticmethod
    def job(
        submission_dir: str | Path,
        rubric: TaskNode | str | Path,
        *,
        priority: str = "train",
        paper: str = "",
        addendum: str = "",
        out_path: str | Path | None = None,
    ) -> Job:
        tree = rubric if isinstance(rubric, TaskNode) else load_rubric(rubric)
        sub = Path(submission_dir).resolve()
        return Job(
            priority=priority,
            submission_dir=str(sub),
            rubric=json.dumps(rubric_to_dict(tree)),
            paper=paper,
            addendum=addendum,
            out_path=str(out_path) if out_path is not None else str(sub.parent / f"{sub.name}.grade.json"),
        )

    async def _run_job(self, job: Job) -> dict[str, Any]:
        task = GradingTask(
            Submission(job.submission_dir),
            rubric_from_dict(json.loads(job.rubric), f"job {job.id}"),
            job.paper,
            job.addendum,
            job.priority,
        )
        result = await self.run(task)
        if job.out_path:
            Path(job.out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(job.out_path).write_text(json.dumps(result.to_dict(), indent=2))
        return result.to_dict()

    def _grader_for(self, leaf: TaskNode) -> LeafGrader | None:
        if leaf.check is not None and self.check is not None:
            return self.check
        return self.llm

    async def run(self, task: GradingTask) -> JudgeResult:
        """Grade every leaf of ``task.rubric`` now (no queue)."""
        start = time.perf_counter()
        sub_hash = task.submission.content_hash
        grades: dict[str, LeafGrade] = {}
        todo: dict[str, list[TaskNode]] = {}
        graders: dict[str, LeafGrader] = {}
        for leaf in task.rubric.leaves():
            grader = self._grader_for(leaf)
            if grader is None:
                grades[leaf.id] = LeafGrade(leaf.id, None, "no grader for this leaf (no LLM judge)", "none", False)
            elif (hit := self.cache.get(sub_hash, leaf, grader.name)) is not None:
                grades[leaf.id] = hit
            else:
                todo.setdefault(grader.name, []).append(leaf)
                graders[grader.name] = grader
        batches = await asyncio.gather(*(graders[name].grade(task, leaves) for name, leaves in todo.items()))
        for (_name, leaves), batch in zip(todo.items(), batches, strict=True):
            grades.update({g.leaf_id: g for g in batch})
            self.cache.put_many(sub_hash, list(zip(leaves, batch, strict=True)))
        valid = {k: g.score for k, g in grades.items() if g.valid and g.score is not None}
        agg = aggregate(task.rubric, valid)
        ordered = {leaf.id: grades[leaf.id] for leaf in task.rubric.leaves()}
        return JudgeResult(
            score=agg.score,
            per_category=category_scores(task.rubric, valid),
            leaves=ordered,
            invalid=list(agg.missing),
            rubric_id=task.rubric.id,
            submission=str(task.submission.root),
            submission_hash=sub_hash,
            duration_s=time.perf_counter() - start,
            node_scores=agg.node_scores,
        )

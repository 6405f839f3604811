"""The judge: grades a submission directory against a rubric and returns the reward.

Dataflow: ``await judge.grade(submission_dir, rubric, priority)`` -> job in the :class:`JudgeQueue`
(eval jobs first, persisted) -> :meth:`Judge.run` -> each leaf routed to a grader (leaves with a
``check`` -> check grader when configured, the others -> LLM grader) -> cached grades reused, the rest
graded concurrently -> valid grades cached (under the grader's ``cache_key``) -> :func:`valid_score` ->
:class:`JudgeResult`, also written as JSON (total, per category, per leaf, token usage) to ``out_path``
(default: ``<submission_dir>.grade.json``).

Honest reward: invalid leaves (grading failed after every retry, or no grader for the leaf) are left out
of the score, never counted 0: the tree is pruned to the valid leaves and every node's remaining children
are re-weighted among themselves (:func:`klong_megatron.judge.rubric.valid_score`). ``invalid_frac`` is the
share of the full rubric's weight carried by the invalid leaves; callers decide whether such a score is
usable (RL and klong-eval compare it with ``max_invalid_frac``). ``token_usage`` sums the calls, prompt and
completion tokens of the leaves graded in this job (cache hits cost nothing and are not counted).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.judge.base import GradingTask, LeafGrade, LeafGrader
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.queue import Job, JudgeQueue
from klong_megatron.judge.rubric import (
    TaskNode,
    load_rubric,
    rubric_from_dict,
    rubric_to_dict,
    valid_score,
)
from klong_megatron.judge.submission import Submission


@dataclass
class JudgeResult:
    """Score in [0, 1] over the valid leaves, per-category scores, per-leaf grades, the leaves that could not
    be graded and their weight share, and the job's token usage (see the module docstring)."""

    score: float
    per_category: dict[str, float]
    leaves: dict[str, LeafGrade]
    invalid: list[str]
    rubric_id: str
    submission: str
    submission_hash: str
    duration_s: float
    node_scores: dict[str, float] = field(default_factory=dict)
    invalid_frac: float = 0.0
    token_usage: dict[str, int] = field(default_factory=dict)

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
        judge_addendum: str = "",
        out_path: str | Path | None = None,
    ) -> JudgeResult:
        """Queue a grading job and wait for it. ``priority``: "eval" jobs are served before "train" jobs.

        ``rubric`` is graded as given: apply the configured transforms first (``factory.prepare_rubric``).
        """
        job = self.job(
            submission_dir,
            rubric,
            priority=priority,
            paper=paper,
            addendum=addendum,
            judge_addendum=judge_addendum,
            out_path=out_path,
        )
        return JudgeResult.from_dict(await self.queue.wait(self.queue.submit(job)))

    @staticmethod
    def job(
        submission_dir: str | Path,
        rubric: TaskNode | str | Path,
        *,
        priority: str = "train",
        paper: str = "",
        addendum: str = "",
        judge_addendum: str = "",
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
            judge_addendum=judge_addendum,
            out_path=str(out_path) if out_path is not None else str(sub.parent / f"{sub.name}.grade.json"),
        )

    async def _run_job(self, job: Job) -> dict[str, Any]:
        task = GradingTask(
            Submission(job.submission_dir),
            rubric_from_dict(json.loads(job.rubric), f"job {job.id}"),
            job.paper,
            job.addendum,
            job.priority,
            job.judge_addendum,
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
        todo: dict[str, list[tuple[TaskNode, str]]] = {}
        graders: dict[str, LeafGrader] = {}
        for leaf in task.rubric.leaves():
            grader = self._grader_for(leaf)
            if grader is None:
                grades[leaf.id] = LeafGrade(leaf.id, None, "no grader for this leaf (no LLM judge)", "none", False)
                continue
            key = grader.cache_key(task, leaf)
            if (hit := self.cache.get(sub_hash, leaf, key)) is not None:
                grades[leaf.id] = hit
            else:
                todo.setdefault(grader.name, []).append((leaf, key))
                graders[grader.name] = grader
        batches = await asyncio.gather(
            *(graders[name].grade(task, [leaf for leaf, _ in items]) for name, items in todo.items())
        )
        for items, batch in zip(todo.values(), batches, strict=True):
            grades.update({g.leaf_id: g for g in batch})
            self.cache.put_many(sub_hash, [(leaf, g, key) for (leaf, key), g in zip(items, batch, strict=True)])
        res = valid_score(task.rubric, {k: g.score for k, g in grades.items() if g.valid and g.score is not None})
        ordered = {leaf.id: grades[leaf.id] for leaf in task.rubric.leaves()}
        return JudgeResult(
            score=res.score,
            per_category=res.per_category,
            leaves=ordered,
            invalid=list(res.invalid),
            rubric_id=task.rubric.id,
            submission=str(task.submission.root),
            submission_hash=sub_hash,
            duration_s=time.perf_counter() - start,
            node_scores=res.node_scores,
            invalid_frac=res.invalid_frac,
            token_usage=token_usage(ordered.values()),
        )


def token_usage(grades: Iterable[LeafGrade]) -> dict[str, int]:
    """Calls and tokens summed over ``grades`` that were graded now (cached grades cost nothing)."""
    out = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for g in grades:
        if not g.cached:
            for k, v in g.meta.get("usage", {}).items():
                out[k] = out.get(k, 0) + int(v)
    return out

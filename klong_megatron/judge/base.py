"""The leaf-grader contract and the records that flow through the judge.

Dataflow: a :class:`GradingTask` (submission + paper + rubric) and a list of leaves -> a
:class:`LeafGrader` -> one :class:`LeafGrade` per leaf. Implementations: ``LLMGrader`` (judge/llm.py,
any OpenAI-compatible endpoint) and ``CheckGrader`` (judge/check.py, ``check`` commands in a sandbox);
both pass the contract tests in tests/integration/test_judge_graders.py.

A grade is either valid (score 0 or 1 with an explanation) or invalid (grading failed after retries);
an invalid grade is never turned into a silent 0: the judge leaves it out of the score and reports its share.
``meta["usage"]`` of an LLM grade holds the token usage of its calls (calls, prompt_tokens, completion_tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from klong_megatron.judge.rubric import TaskNode
from klong_megatron.judge.submission import Submission

PRIORITIES = ("eval", "train")
"""Job / request priorities, most urgent first."""


@dataclass(frozen=True)
class LeafGrade:
    """The grade of one leaf. ``score`` is None exactly when ``valid`` is False."""

    leaf_id: str
    score: float | None
    explanation: str
    grader: str
    valid: bool = True
    attempts: int = 1
    cached: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert (self.score is None) != self.valid, "a valid grade has a score, an invalid one has none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LeafGrade:
        return cls(**d)


@dataclass
class GradingTask:
    """What one grading job looks at. ``paper``, ``addendum`` (the task's ``addendum.md``) and ``judge_addendum``
    (``judge.addendum.md``, shown to the judge only) are Markdown text and may be empty."""

    submission: Submission
    rubric: TaskNode
    paper: str = ""
    addendum: str = ""
    priority: str = "train"
    judge_addendum: str = ""

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")


@runtime_checkable
class LeafGrader(Protocol):
    """Grades leaves of one task. ``name`` identifies the grader (and its model) in caches and reports."""

    name: str

    async def grade(self, task: GradingTask, leaves: Sequence[TaskNode]) -> list[LeafGrade]:
        """One grade per leaf, in order; failures come back as invalid grades, not exceptions."""
        ...

    def cache_key(self, task: GradingTask, leaf: TaskNode) -> str:
        """Identifies everything besides the submission's content and the leaf itself that shapes the grade
        (grader, model, prompts, budgets, paper and addenda): grades are cached under it."""
        ...

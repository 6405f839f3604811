"""LeafGrader contract (LLM grader over HTTP, check grader in real bubblewrap sandboxes) and judge routing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble

from klong_megatron.judge.base import GradingTask, LeafGrade, LeafGrader
from klong_megatron.judge.check import CheckGrader
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.rubric import TaskNode, rubric_from_dict
from klong_megatron.judge.submission import Submission
from klong_megatron.sandbox import Sandbox, SandboxConfig, SandboxError, make_sandbox


def _leaf(i: str, req: str, check: str | None = None, cat: str = "Code Development") -> dict:
    d = {"id": i, "requirements": req, "weight": 1, "sub_tasks": [], "task_category": cat}
    return {**d, "check": check} if check else d


def _rubric() -> TaskNode:
    return rubric_from_dict(
        {
            "id": "root",
            "requirements": "Reproduced.",
            "weight": 1,
            "sub_tasks": [
                _leaf("has_loss", "PASS loss.py exists", "test -f src/loss.py"),
                _leaf("mentions_eq", "PASS Eq. 2 is cited", "grep -q 'Eq. 2' src/loss.py"),
                _leaf("has_tests", "tests exist", "test -d tests"),
                _leaf("runs", "PASS the script runs", "sh reproduce.sh", "Code Execution"),
            ],
        }
    )


@pytest.fixture
def task(tmp_path: Path) -> GradingTask:
    root = tmp_path / "sub"
    (root / "src").mkdir(parents=True)
    (root / "src" / "loss.py").write_text("def loss(x):\n    return x * x  # Eq. 2\n")
    (root / "reproduce.sh").write_text("echo running; exit 0\n")
    return GradingTask(Submission(root), _rubric())


def _bwrap() -> Sandbox:
    return make_sandbox(SandboxConfig(backend="bwrap", memory_mb=1024))


# Both graders judge the same 4 leaves identically here: the LLM test double answers from the word
# PASS in the criterion, the check grader from the commands (tests/ does not exist -> 0).
@pytest.mark.parametrize("kind", ["llm", pytest.param("check", marks=pytest.mark.bwrap)])
def test_grader_contract_one_grade_per_leaf_in_order(kind: str, task: GradingTask) -> None:
    async def go(url: str) -> list[LeafGrade]:
        pool = ChatPool([url], "judge-double")
        grader: LeafGrader = LLMGrader(pool) if kind == "llm" else CheckGrader(_bwrap, timeout_s=30)
        assert isinstance(grader, LeafGrader)
        try:
            return await grader.grade(task, list(task.rubric.leaves()))
        finally:
            await pool.aclose()

    with OpenAIJudgeDouble() as srv:
        grades = asyncio.run(go(srv.url))
    assert [g.leaf_id for g in grades] == ["has_loss", "mentions_eq", "has_tests", "runs"]
    assert [g.score for g in grades] == [1.0, 1.0, 0.0, 1.0]
    assert all(g.valid and g.explanation for g in grades)
    assert len({g.grader for g in grades}) == 1


@pytest.mark.bwrap
def test_check_timeout_scores_zero_and_leaf_without_check_is_invalid(task: GradingTask) -> None:
    leaves = [
        rubric_from_dict(_leaf("slow", "x", "sleep 30")),
        rubric_from_dict(_leaf("nocheck", "x")),
        rubric_from_dict(_leaf("fails", "x", "echo looked-for-results; exit 3")),
    ]
    grades = asyncio.run(CheckGrader(_bwrap, timeout_s=3).grade(task, leaves))
    slow, nocheck, fails = grades
    assert slow.valid and slow.score == 0.0 and slow.meta["timed_out"] and "timed out" in slow.explanation
    assert not nocheck.valid and nocheck.score is None and "no 'check'" in nocheck.explanation
    assert fails.score == 0.0 and "exit code 3" in fails.explanation and "looked-for-results" in fails.explanation


class _CrashOnSecondExec:
    """Wraps a real bwrap sandbox; with ``crash`` its backend 'dies' on the second check (a crashed sandbox)."""

    def __init__(self, inner: Sandbox, crash: bool) -> None:
        self.inner, self.crash, self.calls = inner, crash, 0

    def __enter__(self) -> _CrashOnSecondExec:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def write_file(self, path: str, data: bytes | str) -> None:
        self.inner.write_file(path, data)

    def exec(self, cmd: str, **kw: object):  # noqa: ANN201
        self.calls += 1
        if self.crash and self.calls == 3:  # 1: unpack, 2: first check, 3: crash
            raise SandboxError("sandbox died")
        return self.inner.exec(cmd, **kw)  # type: ignore[arg-type]


@pytest.mark.bwrap
def test_crashed_sandbox_is_reported_and_remaining_leaves_retried(task: GradingTask) -> None:
    made: list[_CrashOnSecondExec] = []

    def factory() -> Sandbox:
        made.append(_CrashOnSecondExec(_bwrap(), crash=not made))
        return made[-1]  # type: ignore[return-value]

    leaves = list(task.rubric.leaves())
    grades = asyncio.run(CheckGrader(factory, timeout_s=30).grade(task, leaves))
    assert [g.score for g in grades] == [1.0, 1.0, 0.0, 1.0]
    assert len(made) == 2 and [g.attempts for g in grades] == [1, 2, 2, 2]

    always = asyncio.run(CheckGrader(lambda: _CrashAlways(), max_sandbox_attempts=2).grade(task, leaves[:1]))
    assert not always[0].valid and "sandbox attempt 2: SandboxError: no sandbox today" in always[0].explanation


class _CrashAlways:
    def __enter__(self) -> _CrashAlways:
        raise SandboxError("no sandbox today")

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.bwrap
def test_judge_routes_check_leaves_to_the_check_grader(task: GradingTask) -> None:
    tree = rubric_from_dict(
        {"id": "r", "requirements": "", "weight": 1, "sub_tasks": [
            _leaf("checked", "anything", "test -f src/loss.py"), _leaf("judged", "PASS looks right")]}
    )  # fmt: skip

    async def go(url: str):
        pool = ChatPool([url], "judge-double")
        async with Judge(llm=LLMGrader(pool), check=CheckGrader(_bwrap)) as judge:
            res = await judge.grade(task.submission.root, tree, priority="eval")
        await pool.aclose()
        return res

    with OpenAIJudgeDouble() as srv:
        res = asyncio.run(go(srv.url))
        assert srv.served == 2  # the judged leaf: ranking + grading; the checked leaf: no model call
    assert res.leaves["checked"].grader == "check" and res.leaves["judged"].grader == "llm:judge-double"
    assert res.score == 1.0 and res.complete

"""LLM grader over real HTTP against the OpenAI-compatible test double: prompts, parsing, retries, failover."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble, Reply, criterion_of, is_ranking, keyword_responder

from klong_megatron.judge.base import GradingTask
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.prompts import QUESTIONS, ReplyParseError, parse_grade, parse_ranking
from klong_megatron.judge.rubric import TaskNode, rubric_from_dict
from klong_megatron.judge.submission import Submission, TokenCounter


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"explanation": "ok", "score": 1}', (1, "ok")),
        ('Here you go:\n```json\n{"score": 0, "explanation": "missing"}\n```', (0, "missing")),
        ('{"Score": "1", "Explanation": "yes"}', (1, "yes")),
        ('{"score": true, "explanation": ""}', (1, "")),
        ("The code is there.\n\nScore: 1.", (1, "The code is there.")),
        ("**Score**: 0", (0, "")),
        ("score = 1.0", (1, "")),
    ],
)
def test_reply_parsing_accepts_json_and_score_lines(reply: str, expected: tuple[int, str]) -> None:
    assert parse_grade(reply) == expected


@pytest.mark.parametrize("reply", ["", "Looks good to me.", '{"score": 0.5}', "Score: 7", '{"score": 2}', "scored 1"])
def test_reply_parsing_rejects_replies_without_a_binary_score(reply: str) -> None:
    with pytest.raises(ReplyParseError, match="no 0/1 score"):
        parse_grade(reply)


def test_ranking_parse_keeps_known_paths_in_order() -> None:
    known = ["a.py", "src/b.py", "README.md"]
    assert parse_ranking('["src/b.py", "nope.py", "./a.py", "src/b.py"]', known) == ["src/b.py", "a.py"]
    assert parse_ranking("- README.md\n- `a.py`\n", known) == ["README.md", "a.py"]


# ---------------------------------------------------------------- fixtures


def _rubric() -> TaskNode:
    def leaf(i: str, req: str, cat: str, w: int = 1) -> dict:
        return {"id": i, "requirements": req, "weight": w, "sub_tasks": [], "task_category": cat}

    return rubric_from_dict(
        {
            "id": "root",
            "requirements": "The paper has been reproduced.",
            "weight": 1,
            "sub_tasks": [
                {
                    "id": "train",
                    "requirements": "The model is trained as in Section 3.",
                    "weight": 3,
                    "sub_tasks": [
                        leaf("code", "PASS The loss of Eq. 2 is implemented.", "Code Development"),
                        leaf("run", "The training ran for 10 epochs.", "Code Execution"),
                    ],
                },
                leaf("result", "PASS Accuracy above 90% is reported.", "Result Analysis", 1),
            ],
        }
    )


@pytest.fixture
def submission(tmp_path: Path) -> Submission:
    root = tmp_path / "sub"
    (root / "src").mkdir(parents=True)
    (root / "README.md").write_text("# Reproduction\nRun reproduce.sh\n")
    (root / "src" / "loss.py").write_text("def loss(x):\n    return (x ** 2).mean()  # Eq. 2\n")
    (root / "reproduce.sh").write_text("python src/loss.py\n")
    (root / "reproduce.log").write_text("epoch 10/10 accuracy=0.93\n")
    (root / "weights.bin").write_bytes(b"\0\1\2" * 100)
    return Submission(root)


def _grade(urls: list[str], task: GradingTask, **kw) -> list:
    async def go() -> list:
        pool = ChatPool(urls, "judge-double", max_concurrency=kw.pop("max_concurrency", 4), cooldown_s=30)
        grader = LLMGrader(pool, backoff_s=0.01, backoff_max_s=0.05, **kw)
        try:
            return await grader.grade(task, list(task.rubric.leaves()))
        finally:
            await pool.aclose()

    return asyncio.run(go())


# ---------------------------------------------------------------- grading behaviour


def test_grades_follow_the_reply_and_prompts_carry_the_right_context(submission: Submission) -> None:
    task = GradingTask(submission, _rubric(), paper="# The Paper\nEq. 2 is the loss.", addendum="Use seed 0.")
    with OpenAIJudgeDouble() as srv:
        grades = _grade([srv.url], task)
    assert [(g.leaf_id, g.score, g.valid) for g in grades] == [
        ("code", 1.0, True),
        ("run", 0.0, True),
        ("result", 1.0, True),
    ]
    prompts = {criterion_of(r): r["messages"][1]["content"] for r in srv.requests}
    code, run = prompts["PASS The loss of Eq. 2 is implemented."], prompts["The training ran for 10 epochs."]
    for p in (code, run):
        assert "# The Paper" in p and "Use seed 0." in p
        assert "The model is trained as in Section 3." in p  # preceding criteria
        assert "## File: src/loss.py" in p and "weights.bin" not in p
    assert QUESTIONS["Code Development"] in code and "epoch 10/10" not in code
    assert QUESTIONS["Code Execution"] in run and "epoch 10/10 accuracy=0.93" in run and "# reproduce.sh" in run


def test_malformed_reply_is_retried_with_a_format_reminder(submission: Submission) -> None:
    calls = {"n": 0}

    def responder(body: dict) -> Reply | str:
        calls["n"] += 1
        return "I am not sure what to say." if calls["n"] == 1 else '{"score": 1, "explanation": "fine"}'

    task = GradingTask(submission, _single_leaf())
    with OpenAIJudgeDouble(responder) as srv:
        (g,) = _grade([srv.url], task)
    assert (g.score, g.valid, g.attempts) == (1.0, True, 2)
    second = srv.requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "I am not sure what to say."}
    assert "could not be parsed" in second[-1]["content"]


def _single_leaf(cat: str = "Code Development") -> TaskNode:
    return rubric_from_dict(
        {"id": "only", "requirements": "Something holds.", "weight": 1, "sub_tasks": [], "task_category": cat}
    )


def test_leaf_that_never_parses_is_invalid_not_zero(submission: Submission) -> None:
    with OpenAIJudgeDouble(lambda body: "Score: maybe") as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()), max_attempts=3)
    assert srv.served == 3
    assert g.valid is False and g.score is None and g.attempts == 3
    assert "after 3 attempts" in g.explanation and "no 0/1 score" in g.explanation


def test_server_errors_are_retried_with_backoff_and_client_errors_are_not(submission: Submission) -> None:
    calls = {"n": 0}

    def flaky(body: dict) -> Reply | str:
        calls["n"] += 1
        return Reply("overloaded", status=503) if calls["n"] <= 2 else '{"score": 0, "explanation": "no"}'

    with OpenAIJudgeDouble(flaky) as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()))
    assert (g.score, g.valid, g.attempts) == (0.0, True, 3)
    with OpenAIJudgeDouble(lambda body: Reply("context too long", status=400)) as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()))
    assert srv.served == 1 and not g.valid and "HTTP 400" in g.explanation


def test_dead_endpoint_fails_over_to_a_live_one(submission: Submission) -> None:
    with OpenAIJudgeDouble() as live, OpenAIJudgeDouble(lambda body: Reply(drop=True)) as dying:
        dead = OpenAIJudgeDouble().start()
        dead_url = dead.url
        dead.stop()
        task = GradingTask(submission, _rubric())
        grades = _grade([dead_url, dying.url, live.url], task, max_attempts=1)
    assert all(g.valid for g in grades)
    assert [g.score for g in grades] == [1.0, 0.0, 1.0]


def test_concurrency_per_endpoint_is_bounded(submission: Submission) -> None:
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def slow(body: dict) -> Reply | str:
        import time

        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return keyword_responder(body)

    leaves = [
        {
            "id": f"l{i}",
            "requirements": f"PASS item {i}",
            "weight": 1,
            "sub_tasks": [],
            "task_category": "Code Development",
        }
        for i in range(12)
    ]
    tree = rubric_from_dict({"id": "r", "requirements": "", "weight": 1, "sub_tasks": leaves})
    with OpenAIJudgeDouble(slow) as srv:
        grades = _grade([srv.url], GradingTask(submission, tree), max_concurrency=3)
    assert all(g.score == 1.0 for g in grades)
    assert state["peak"] == 3


def test_files_are_ranked_and_cut_to_the_token_budget(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    (root / "README.md").write_text("readme " * 400)
    (root / "notes.txt").write_text("note " * 400)
    (root / "model.py").write_text("x = 1\n" * 300)
    counter = TokenCounter()
    task = GradingTask(Submission(root), _single_leaf())
    with OpenAIJudgeDouble() as srv:  # ranks *.py files first
        (g,) = _grade([srv.url], task, file_token_budget=600, counter=counter)
    assert g.valid and g.meta["file_selection"] == "ranked"
    assert g.meta["files"][0] == "model.py"
    grading = [r for r in srv.requests if not is_ranking(r)][0]["messages"][1]["content"]
    files_part = grading.split("# Submission files")[1].split("# Preceding criteria")[0]
    assert "## File: model.py" in files_part and "## File: README.md" not in files_part
    assert counter.count(files_part) <= 600 + 50  # the budget plus headers


# ---------------------------------------------------------------- judge: cache and per-leaf JSON


def test_judge_writes_per_leaf_json_and_reuses_cached_grades(submission: Submission, tmp_path: Path) -> None:
    async def go(url: str, cache: GradeCache) -> list:
        pool = ChatPool([url], "judge-double")
        results = []
        async with Judge(llm=LLMGrader(pool), cache=cache) as judge:
            for _ in range(2):
                results.append(await judge.grade(submission.root, _rubric(), priority="eval"))
        await pool.aclose()
        return results

    cache = GradeCache(tmp_path / "cache.sqlite")
    with OpenAIJudgeDouble() as srv:
        first, second = asyncio.run(go(srv.url, cache))
        assert srv.served == 3  # the second grading came from the cache
    # 'train' (weight 3): code=1, run=0 -> 0.5; 'result' (weight 1) = 1 -> (3 * 0.5 + 1) / 4
    assert first.score == pytest.approx(0.625) and second.score == first.score
    assert first.per_category == {"Code Development": 1.0, "Code Execution": 0.0, "Result Analysis": 1.0}
    assert all(g.cached for g in second.leaves.values()) and not any(g.cached for g in first.leaves.values())
    saved = json.loads((submission.root.parent / "sub.grade.json").read_text())
    assert saved["score"] == pytest.approx(0.625) and set(saved["leaves"]) == {"code", "run", "result"}
    assert saved["leaves"]["run"]["explanation"].startswith("scripted by the test double")

    (submission.root / "src" / "loss.py").write_text("changed\n")  # a new submission hash: graded again
    with OpenAIJudgeDouble() as srv:
        asyncio.run(go(srv.url, GradeCache(tmp_path / "cache.sqlite")))
        assert srv.served == 3


def test_invalid_leaves_are_reported_and_counted_zero(submission: Submission) -> None:
    def responder(body: dict) -> Reply | str:
        return "no idea" if "Accuracy" in criterion_of(body) else keyword_responder(body)

    async def go(url: str):
        pool = ChatPool([url], "judge-double")
        async with Judge(llm=LLMGrader(pool, max_attempts=2)) as judge:
            res = await judge.grade(submission.root, _rubric())
        await pool.aclose()
        return res

    with OpenAIJudgeDouble(responder) as srv:
        res = asyncio.run(go(srv.url))
    assert res.invalid == ["result"] and not res.complete
    assert res.leaves["result"].score is None
    assert res.score == pytest.approx(3 * 0.5 / 4)

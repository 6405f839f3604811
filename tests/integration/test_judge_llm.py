"""LLM grader over real HTTP against the OpenAI-compatible test double: evidence per category, parsing, retries,
failover, cache keys, token usage, the honest score."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
from openai_judge_double import (
    OpenAIJudgeDouble,
    Reply,
    criterion_of,
    grade_reply,
    is_parse,
    is_ranking,
    keyword_responder,
)

from klong_megatron.judge.base import GradingTask
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.prompts import QUESTIONS, ReplyParseError, parse_grade, parse_ranking, parse_structured
from klong_megatron.judge.rubric import TaskNode, rubric_from_dict
from klong_megatron.judge.submission import Submission, TokenCounter

GRADED = "# Expectations\nA loss.\n\n# Reality\nsrc/loss.py has it.\n\n# Score\n"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (GRADED + "1", (1, "# Reality\nsrc/loss.py has it.\n\n# Score\n1")),
        (GRADED + "The criterion is met: **1**.", (1, None)),
        (GRADED + "Score: 0 (the loss is missing)", (0, None)),
        ("# Score\n0.0", (0, None)),
        ('{"explanation": "ok", "score": 1}', (1, "ok")),
        ('Here you go:\n```json\n{"score": 0, "explanation": "missing"}\n```', (0, "missing")),
    ],
)
def test_reply_parsing_reads_the_score_section_or_a_json_score(reply: str, expected: tuple) -> None:
    score, explanation = parse_grade(reply)
    assert score == expected[0] and (expected[1] is None or explanation == expected[1])


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "Looks good to me.",
        "Score: 1",
        GRADED + "0 or 1? I give 1.",
        GRADED + "maybe",
        '{"score": 0.5}',
        "# Score\n10",
    ],
)
def test_reply_parsing_rejects_replies_without_one_clear_score(reply: str) -> None:
    with pytest.raises(ReplyParseError):
        parse_grade(reply)


def test_structured_parse_needs_a_valid_binary_score() -> None:
    assert parse_structured('{"valid_score": true, "score": 1, "explanation": "met"}') == (1, "met")
    for bad in ('{"valid_score": false, "score": 0, "explanation": ""}', '{"valid_score": true, "score": 3}', "no"):
        with pytest.raises(ReplyParseError):
            parse_structured(bad)


def test_ranking_parse_keeps_known_paths_in_order() -> None:
    known = ["a.py", "src/b.py", "README.md"]
    assert parse_ranking('["src/b.py", "nope.py", "./a.py", "src/b.py"]', known) == ["src/b.py", "a.py"]
    assert parse_ranking("README.md\n/a.py\n- src/b.py\n", known) == ["README.md", "a.py", "src/b.py"]


# ---------------------------------------------------------------- fixtures

T0 = 1_800_000_000.0  # when the reproduction run started (reproduce.meta.json)


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


def make_submission(root: Path, *, results_after_run: bool = True) -> Submission:
    """Code written before the run (T0), results.csv written by it (after T0) unless ``results_after_run``."""
    (root / "src").mkdir(parents=True)
    files = {
        "README.md": "# Reproduction\nRun reproduce.sh\n",
        "src/loss.py": "def loss(x):\n    return (x ** 2).mean()  # Eq. 2\n",
        "reproduce.sh": "python src/loss.py > results.csv\n",
        "reproduce.log": "epoch 10/10 accuracy=0.93\n",
        "results.csv": "epoch,accuracy\n10,0.93\n",
        "notes.csv": "an old table\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
        os.utime(root / rel, (T0 - 100, T0 - 100))
    if results_after_run:
        os.utime(root / "results.csv", (T0 + 50, T0 + 50))
    (root / "weights.bin").write_bytes(b"\0\1\2" * 100)
    meta = {"exit_code": 0, "duration_s": 60.0, "timed_out": False, "missing_script": False, "log_created_at": T0}
    (root / "reproduce.meta.json").write_text(json.dumps(meta))
    return Submission(root)


@pytest.fixture
def submission(tmp_path: Path) -> Submission:
    return make_submission(tmp_path / "sub")


def _grade(urls: list[str], task: GradingTask, **kw) -> list:
    async def go() -> list:
        pool = ChatPool(urls, "judge-double", max_concurrency=kw.pop("max_concurrency", 4), cooldown_s=30)
        grader = LLMGrader(pool, backoff_s=0.01, backoff_max_s=0.05, **kw)
        try:
            return await grader.grade(task, list(task.rubric.leaves()))
        finally:
            await pool.aclose()

    return asyncio.run(go())


def _prompt(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"])


# ---------------------------------------------------------------- grading behaviour


def test_grades_follow_the_reply_and_each_category_sees_its_evidence(submission: Submission) -> None:
    task = GradingTask(
        submission, _rubric(), paper="# The Paper\nEq. 2 is the loss.", addendum="Use seed 0.", judge_addendum="JN"
    )
    with OpenAIJudgeDouble() as srv:
        grades = _grade([srv.url], task)
    assert [(g.leaf_id, g.score, g.valid) for g in grades] == [
        ("code", 1.0, True),
        ("run", 0.0, True),
        ("result", 1.0, True),
    ]
    graded = {criterion_of(r): _prompt(r) for r in srv.requests if not is_ranking(r) and not is_parse(r)}
    code, run = graded["PASS The loss of Eq. 2 is implemented."], graded["The training ran for 10 epochs."]
    result = graded["PASS Accuracy above 90% is reported."]
    for p in (code, run, result):
        assert "# The Paper" in p and "<addendum>\nUse seed 0.\nJN\n</addendum>" in p  # both addenda, joined
        assert " -> The model is trained as in Section 3.\n" in p or p is result
        assert "weights.bin" not in p and "reproduce.meta.json" not in p
    assert " -> PASS The loss of Eq. 2 is implemented." in run  # a preceding sibling is context
    assert "<FILE:src/loss.py>" in code and "<reproduce.sh>\npython src/loss.py" in code
    assert "epoch 10/10" not in code and QUESTIONS["Code Development"] in code
    assert QUESTIONS["Code Execution"] in run and "<reproduce.log>\nepoch 10/10 accuracy=0.93" in run
    # Result Analysis: docs and tables written during the run only
    assert "<FILE:results.csv>" in result and "<FILE:README.md>" in result
    assert "notes.csv" not in result and "src/loss.py" not in result.split("<files>")[1].split("</files>")[0]
    assert all(g.meta["usage"]["calls"] == 2 for g in grades)  # ranking + grading, strict parse


def test_result_analysis_scores_zero_without_a_call_when_the_run_touched_nothing(tmp_path: Path) -> None:
    sub = make_submission(tmp_path / "stale", results_after_run=False)
    with OpenAIJudgeDouble() as srv:
        grades = _grade([srv.url], GradingTask(sub, _rubric()))
    result = grades[-1]
    assert (result.leaf_id, result.score, result.valid) == ("result", 0.0, True)
    assert "no output file was created or modified" in result.explanation
    assert not any("Accuracy above" in criterion_of(r) for r in srv.requests)
    (sub.root / "reproduce.meta.json").unlink()  # fallback: the log's mtime (T0 - 100): notes.csv is not older
    with OpenAIJudgeDouble() as srv:
        grades = _grade([srv.url], GradingTask(Submission(sub.root), _rubric()))
    assert grades[-1].score == 1.0 and any("Accuracy above" in criterion_of(r) for r in srv.requests)


def test_malformed_reply_goes_to_the_structured_parse_then_is_asked_again(submission: Submission) -> None:
    calls = {"grade": 0}

    def responder(body: dict) -> Reply | str:
        if is_ranking(body):
            return "src/loss.py"
        if is_parse(body):
            assert body["response_format"]["json_schema"]["schema"]["required"] == [
                "valid_score",
                "score",
                "explanation",
            ]
            return json.dumps({"valid_score": False, "score": 0, "explanation": "no score"})
        calls["grade"] += 1
        return "I am not sure what to say." if calls["grade"] == 1 else grade_reply(1)

    task = GradingTask(submission, _single_leaf())
    with OpenAIJudgeDouble(responder) as srv:
        (g,) = _grade([srv.url], task)
    assert (g.score, g.valid, g.attempts) == (1.0, True, 2) and g.meta["parse"] == "strict"
    second = [r for r in srv.requests if not is_ranking(r) and not is_parse(r)][1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "I am not sure what to say."}
    assert "# Score part must state 0 or 1" in second[-1]["content"]
    assert g.meta["usage"]["calls"] == 4  # rank, grade, parse, grade


def test_structured_mode_always_parses_with_a_second_call(submission: Submission) -> None:
    with OpenAIJudgeDouble() as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf("Code Development", "PASS x")),
                      parse_mode="structured")  # fmt: skip
    assert g.score == 1.0 and g.meta["parse"] == "structured" and sum(map(is_parse, srv.requests)) == 1


def _single_leaf(cat: str = "Code Development", req: str = "Something holds.") -> TaskNode:
    return rubric_from_dict({"id": "only", "requirements": req, "weight": 1, "sub_tasks": [], "task_category": cat})


def test_leaf_that_never_parses_is_invalid_not_zero(submission: Submission) -> None:
    def responder(body: dict) -> str:
        return json.dumps({"valid_score": False, "score": 0, "explanation": "-"}) if is_parse(body) else "maybe"

    with OpenAIJudgeDouble(responder) as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()), max_attempts=3)
    assert srv.served == 1 + 3 * 2  # ranking, then 3 x (grading + parse)
    assert g.valid is False and g.score is None and g.attempts == 3
    assert "no score after 3 grading calls" in g.explanation


def test_transient_errors_are_retried_until_the_retry_time_runs_out(submission: Submission) -> None:
    calls = {"n": 0}

    def flaky(body: dict) -> Reply | str:
        calls["n"] += 1
        return Reply("overloaded", status=503) if calls["n"] <= 4 else keyword_responder(body)

    with OpenAIJudgeDouble(flaky) as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()))
    assert (g.score, g.valid) == (0.0, True) and srv.served == 4 + 2
    with OpenAIJudgeDouble(lambda body: Reply("down", status=503)) as srv:
        t0 = time.monotonic()
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()), retry_timeout_s=0.5)
        waited = time.monotonic() - t0
    assert not g.valid and "transient failures for 0.5 s" in g.explanation and waited >= 0.5
    assert srv.served > 3  # kept trying for the whole retry time
    with OpenAIJudgeDouble(lambda body: Reply("context too long", status=400)) as srv:
        (g,) = _grade([srv.url], GradingTask(submission, _single_leaf()))
    assert srv.served == 2 and not g.valid and "HTTP 400" in g.explanation  # ranking fell back, grading failed
    assert g.meta["file_selection"].startswith("default (ranking request rejected")


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


def test_ranked_files_are_packed_in_order_into_the_budget(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    (root / "README.md").write_text("readme " * 400)
    (root / "notes.txt").write_text("note " * 400)
    (root / "model.py").write_text("x = 1\n" * 300)
    for i in range(12):
        (root / f"m{i:02d}.py").write_text("y = 2\n")
    counter = TokenCounter()
    task = GradingTask(Submission(root), _single_leaf())
    with OpenAIJudgeDouble() as srv:  # ranks the *.py files, tree order
        (g,) = _grade([srv.url], task, file_token_budget=600, counter=counter)
        (g10,) = _grade([srv.url], task, file_token_budget=10_000, counter=counter)
    assert g.valid and g.meta["file_selection"] == "ranked"
    assert g.meta["files"][:2] == ["m00.py", "m01.py"]
    grading = [_prompt(r) for r in srv.requests if not is_ranking(r)][0]
    files_part = grading.split("<files>")[1].split("</files>")[0]
    assert "<FILE:m00.py>" in files_part and "README.md" not in files_part
    assert counter.count(files_part) <= 600 + 5
    assert len(g10.meta["files"]) == 10  # at most 10 files, as PaperBench


# ---------------------------------------------------------------- judge: cache, usage, honest score


async def _judge_twice(url: str, cache: GradeCache, sub: Path, **task) -> list:
    pool = ChatPool([url], "judge-double")
    results = []
    async with Judge(llm=LLMGrader(pool), cache=cache) as judge:
        for _ in range(2):
            results.append(await judge.grade(sub, _rubric(), priority="eval", **task))
    await pool.aclose()
    return results


def test_judge_writes_per_leaf_json_usage_and_reuses_cached_grades(submission: Submission, tmp_path: Path) -> None:
    cache = GradeCache(tmp_path / "cache.sqlite")
    with OpenAIJudgeDouble() as srv:
        first, second = asyncio.run(_judge_twice(srv.url, cache, submission.root))
        assert srv.served == 6  # ranking + grading per leaf; the second grading came from the cache
    # 'train' (weight 3): code=1, run=0 -> 0.5; 'result' (weight 1) = 1 -> (3 * 0.5 + 1) / 4
    assert first.score == pytest.approx(0.625) and second.score == first.score
    assert first.per_category == {"Code Development": 1.0, "Code Execution": 0.0, "Result Analysis": 1.0}
    assert all(g.cached for g in second.leaves.values()) and not any(g.cached for g in first.leaves.values())
    sent = sum(len(_prompt(r)) for r in srv.requests)  # the double reports characters as prompt tokens
    assert first.token_usage["calls"] == 6 and first.token_usage["prompt_tokens"] == sent
    assert second.token_usage["calls"] == 0  # cached grades cost nothing
    saved = json.loads((submission.root.parent / "sub.grade.json").read_text())
    assert saved["score"] == pytest.approx(0.625) and set(saved["leaves"]) == {"code", "run", "result"}
    assert saved["token_usage"]["calls"] == 0 and saved["leaves"]["run"]["meta"]["usage"]["calls"] == 2
    assert "scripted by the test double" in saved["leaves"]["run"]["explanation"]


def test_cache_key_covers_submission_paper_addenda_and_request_settings(submission: Submission, tmp_path) -> None:
    cache = GradeCache(tmp_path / "cache.sqlite")
    with OpenAIJudgeDouble() as srv:
        asyncio.run(_judge_twice(srv.url, cache, submission.root, paper="v1"))
        for change in ({"paper": "v2"}, {"paper": "v1", "judge_addendum": "note"}):
            before = srv.served
            asyncio.run(_judge_twice(srv.url, cache, submission.root, **change))
            assert srv.served == before + 6, change
        before = srv.served
        asyncio.run(_judge_twice(srv.url, cache, submission.root, paper="v1"))
        assert srv.served == before  # the first setting is still cached
        pool = ChatPool([srv.url], "judge-double")
        task = GradingTask(submission, _rubric(), paper="v1")
        leaf = next(task.rubric.leaves())
        keys = {
            LLMGrader(pool).cache_key(task, leaf),
            LLMGrader(pool, request_params={"reasoning_effort": "low"}).cache_key(task, leaf),
            LLMGrader(pool, file_token_budget=1000).cache_key(task, leaf),
            LLMGrader(pool, parse_mode="structured").cache_key(task, leaf),
        }
        assert len(keys) == 4


def test_invalid_leaves_are_left_out_of_the_score_and_their_share_reported(submission: Submission) -> None:
    def responder(body: dict) -> Reply | str:
        if is_parse(body) and body["messages"][-1]["content"] == "no idea":
            return json.dumps({"valid_score": False, "score": 0, "explanation": ""})
        if "Accuracy" in criterion_of(body) and not is_ranking(body):
            return "no idea"
        return keyword_responder(body)

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
    # 'result' carries 1/4 of the rubric; the score is over 'train' alone: (1 + 0) / 2
    assert res.invalid_frac == pytest.approx(0.25) and res.score == pytest.approx(0.5)
    assert "Result Analysis" not in res.per_category

"""klong-judge end to end: real rubric file, OpenAI-compatible test double, per-category table, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble, grade_reply, is_parse, is_ranking

from klong_megatron.cli.judge import main
from klong_megatron.judge.rubric import load_rubric

SHARED = Path(__file__).resolve().parents[3] / "shared"
TASK = SHARED / "data" / "paperbench_tasks" / "stochastic-interpolants"  # a real PaperBench task folder
RUBRIC = TASK / "rubric.json"
TOKENIZER = f"judge.tokenizer={SHARED / 'real_tokenizers' / 'qwen3'}"  # a real tokenizer counts the budgets


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    sub = tmp_path / "attempt"
    sub.mkdir()
    (sub / "interpolant.py").write_text("def interpolate(x0, x1, t):\n    return (1 - t) * x0 + t * x1\n")
    (sub / "reproduce.sh").write_text("python interpolant.py\n")
    (sub / "reproduce.log").write_text("done\n")
    return sub


def test_cli_grades_a_real_task_folder_and_prints_categories(submission: Path, capsys: pytest.CaptureFixture) -> None:
    with OpenAIJudgeDouble(lambda body: "interpolant.py" if is_ranking(body) else grade_reply(1)) as srv:
        rc = main([str(submission), str(TASK), "judge.use_checks=false", f"judge.endpoints=[{srv.url}]",
                   "judge.model=judge-double", "judge.code_only=true", TOKENIZER])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "Code Development" in out and "Code Execution" not in out and "score 1.0000" in out
    assert "judge calls 116" in out  # ranking + grading per leaf, reported with the tokens
    saved = json.loads((submission.parent / "attempt.grade.json").read_text())
    assert len(saved["leaves"]) == 58 and saved["score"] == pytest.approx(1.0)  # the 58 Code Development leaves
    assert srv.served == 2 * 58 and saved["token_usage"]["calls"] == 116
    grading = [r for r in srv.requests if not is_ranking(r)]
    paper_head = (TASK / "paper.md").read_text()[:200]
    assert all(paper_head in r["messages"][1]["content"] for r in grading)  # paper.md read from the folder
    assert all("(NO ADDENDUM GIVEN)" in r["messages"][2]["content"] for r in grading)  # none in this folder
    assert not any("reproduce.sh" in m["content"] for r in grading for m in r["messages"][2:])  # code-only


def test_cli_refuses_a_context_window_without_the_judge_tokenizer(submission: Path, capsys) -> None:
    assert main([str(submission), str(RUBRIC), "--dry-run", "judge.tokenizer=null"]) == 2
    assert "tokenizer must be set when context_window is set" in capsys.readouterr().err
    assert main([str(submission), str(RUBRIC), "--dry-run", "judge.model=/no/such/model"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_cli_reports_invalid_leaves_with_exit_code_3(submission: Path, capsys: pytest.CaptureFixture) -> None:
    out_path = submission.parent / "g.json"

    def responder(body: dict) -> str:
        return json.dumps({"valid_score": False, "score": 0, "explanation": ""}) if is_parse(body) else "unsure"

    with OpenAIJudgeDouble(responder) as srv:
        rc = main([str(submission), str(RUBRIC), "--out", str(out_path), "judge.use_checks=false", TOKENIZER,
                   f"judge.endpoints=[{srv.url}]", "judge.max_attempts=1", "judge.max_depth=2"])  # fmt: skip
    assert rc == 3
    assert "could not be graded" in capsys.readouterr().out
    saved = json.loads(out_path.read_text())
    # max_depth=2 (root = 1, as PaperBench counts): every child of the root is graded as one leaf; those of
    # Result Analysis score 0 without a call (the run wrote no result files), the others are invalid
    cats = {k: g["grader"] for k, g in saved["leaves"].items()}
    assert set(cats) == {n.id for n in load_rubric(RUBRIC).sub_tasks}
    results = {k for k, g in saved["leaves"].items() if g["valid"]}
    assert results and all(saved["leaves"][k]["score"] == 0.0 for k in results)
    assert set(saved["invalid"]) == set(cats) - results and 0 < saved["invalid_frac"] < 1


def test_cli_bad_inputs_exit_2_naming_the_problem(submission: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    raw = json.loads(RUBRIC.read_text())
    raw["sub_tasks"][0]["weight"] = -1
    bad.write_text(json.dumps(raw))
    assert main([str(submission), str(bad), "--dry-run"]) == 2
    assert f"node {raw['sub_tasks'][0]['id']!r} at $.sub_tasks[0]" in capsys.readouterr().err
    assert main([str(submission), str(RUBRIC), "--dry-run", "judge.max_concurrent_jobs=0"]) == 2
    assert "max_concurrent_jobs" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(RUBRIC), "--dry-run"]) == 2
    assert main([str(submission), str(RUBRIC), "--dry-run", TOKENIZER]) == 0
    assert "69 leaves" in capsys.readouterr().out

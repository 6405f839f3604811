"""klong-judge end to end: real rubric file, OpenAI-compatible test double, per-category table, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble

from klong_megatron.cli.judge import main
from klong_megatron.judge.rubric import load_rubric

RUBRIC = Path(__file__).resolve().parents[1] / "data" / "paperbench_rubrics" / "stochastic-interpolants.rubric.json"


@pytest.fixture
def submission(tmp_path: Path) -> Path:
    sub = tmp_path / "attempt"
    sub.mkdir()
    (sub / "interpolant.py").write_text("def interpolate(x0, x1, t):\n    return (1 - t) * x0 + t * x1\n")
    (sub / "reproduce.sh").write_text("python interpolant.py\n")
    (sub / "reproduce.log").write_text("done\n")
    return sub


def test_cli_grades_a_real_rubric_and_prints_categories(submission: Path, capsys: pytest.CaptureFixture) -> None:
    with OpenAIJudgeDouble(lambda body: '{"score": 1, "explanation": "ok"}') as srv:
        rc = main([str(submission), str(RUBRIC), "judge.use_checks=false", f"judge.endpoints=[{srv.url}]",
                   "judge.model=judge-double", "judge.code_only=true"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "Code Development" in out and "Code Execution" not in out and "score 1.0000" in out
    saved = json.loads((submission.parent / "attempt.grade.json").read_text())
    assert len(saved["leaves"]) == 58 and saved["score"] == pytest.approx(1.0)  # the 58 Code Development leaves
    assert srv.served == 58


def test_cli_reports_invalid_leaves_with_exit_code_3(submission: Path, capsys: pytest.CaptureFixture) -> None:
    out_path = submission.parent / "g.json"
    with OpenAIJudgeDouble(lambda body: "cannot decide") as srv:
        rc = main([str(submission), str(RUBRIC), "--out", str(out_path), "judge.use_checks=false",
                   f"judge.endpoints=[{srv.url}]", "judge.max_attempts=1", "judge.max_depth=1"])  # fmt: skip
    assert rc == 3
    assert "could not be graded" in capsys.readouterr().out
    saved = json.loads(out_path.read_text())
    assert saved["score"] == 0.0 and len(saved["invalid"]) == len(load_rubric(RUBRIC).sub_tasks)


def test_cli_bad_inputs_exit_2_naming_the_problem(submission: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    raw = json.loads(RUBRIC.read_text())
    raw["sub_tasks"][0]["weight"] = -1
    bad.write_text(json.dumps(raw))
    assert main([str(submission), str(bad), "--dry-run"]) == 2
    assert f"node {raw['sub_tasks'][0]['id']!r} at $.sub_tasks[0]" in capsys.readouterr().out.replace("\n", "")
    assert main([str(submission), str(RUBRIC), "--dry-run", "judge.max_concurrent_jobs=0"]) == 2
    assert "max_concurrent_jobs" in capsys.readouterr().out
    assert main([str(tmp_path / "nope"), str(RUBRIC), "--dry-run"]) == 2
    assert main([str(submission), str(RUBRIC), "--dry-run"]) == 0
    assert "69 leaves" in capsys.readouterr().out

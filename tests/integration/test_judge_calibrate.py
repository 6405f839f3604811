"""``klong-judge calibrate``: judge grades against human grades, with PaperBench JudgeEval's metrics.

The human-graded example is synthetic (human grades scripted per criterion) on a real PaperBench rubric subtree and
paper folder (../shared/data/paperbench_tasks/stochastic-interpolants), laid out as PaperBench's
data/judge_eval (<paper_id>/<n>/submission + grading/expected_result.json with GradedTaskNode fields). Metric
definitions: paperbench/judge/judge_eval/evaluate.py (scikit-learn macro averages, zero_division=0).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble, criterion_of, grade_reply, is_ranking

from klong_megatron.cli.judge import main
from klong_megatron.judge.calibrate import binary_metrics, graded_tree
from klong_megatron.judge.rubric import load_rubric, rubric_to_dict

TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_tasks"


def test_binary_metrics_match_scikit_learns_macro_definitions() -> None:
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (m.tp, m.fn, m.fp, m.tn, m.n, m.positives) == (2, 1, 1, 1, 5, 3)
    # label 1: P = R = F1 = 2/3; label 0: P = R = F1 = 1/2; macro = mean of the two
    assert m.accuracy == pytest.approx(0.6) and m.f1 == pytest.approx(7 / 12)
    assert m.precision == pytest.approx(7 / 12) and m.recall == pytest.approx(7 / 12)
    one_label = binary_metrics([1, 1], [1, 1])  # scikit-learn averages over the labels present only
    assert one_label.f1 == 1.0 and one_label.accuracy == 1.0
    never_right = binary_metrics([1, 0], [0, 1])
    assert never_right.f1 == 0.0 and never_right.accuracy == 0.0


def _human(req: str) -> int:
    return int(hashlib.sha256(req.encode()).digest()[0] % 3 != 0)


def _judge(req: str) -> int:
    return int(hashlib.sha256(req.encode()).digest()[1] % 2 == 0)


def _graded(node: dict) -> dict:
    """A PaperBench GradedTaskNode dict: human grades on leaves, aggregated scores above (not used)."""
    subs = [_graded(c) for c in node["sub_tasks"]]
    score = _human(node["requirements"]) if not subs else sum(c["score"] for c in subs) / len(subs)
    return {
        **node,
        "sub_tasks": subs,
        "score": score,
        "valid_score": True,
        "explanation": "human",
        "judge_metadata": None,
    }


def _example(data: Path) -> Path:
    rubric = load_rubric(TASKS / "stochastic-interpolants" / "rubric.json").sub_tasks[3]  # 25 leaves, 3 categories
    ex = data / "stochastic-interpolants" / "0"
    (ex / "grading").mkdir(parents=True)
    (ex / "grading" / "expected_result.json").write_text(json.dumps(_graded(rubric_to_dict(rubric))))
    sub = ex / "submission"
    sub.mkdir()
    for rel, text in {"README.md": "# Interpolants\n", "model.py": "def velocity(x, t):\n    return x\n",
                      "reproduce.sh": "python model.py\n", "reproduce.log": "FID 5.2\n"}.items():  # fmt: skip
        (sub / rel).write_text(text)
        os.utime(sub / rel, (1e9, 1e9))
    (sub / "results.csv").write_text("fid\n5.2\n")  # written by the run (newer than the log)
    return ex


def test_calibrate_reports_pooled_macro_f1_and_confusion_counts(tmp_path: Path, capsys) -> None:
    ex = _example(tmp_path / "judge_eval")

    def responder(body: dict) -> str:
        return "model.py" if is_ranking(body) else grade_reply(_judge(criterion_of(body)))

    with OpenAIJudgeDouble(responder) as srv:
        rc = main(["calibrate", str(tmp_path / "judge_eval"), "--papers", str(TASKS), f"judge.endpoints=[{srv.url}]",
                   "judge.model=judge-double", "judge.use_checks=false", "judge.context_window=null",
                   "judge.tokenizer=null"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "macro-F1" in out and "0.827" in out  # PaperBench's reference figure next to ours
    report = json.loads((tmp_path / "judge_eval" / "calibration.json").read_text())
    tree, human = graded_tree(json.loads((ex / "grading" / "expected_result.json").read_text()), "x")
    leaves = list(tree.leaves())
    for cat in ("Overall", "Code Development", "Code Execution", "Result Analysis"):
        picked = [leaf for leaf in leaves if cat in ("Overall", leaf.task_category)]
        want = binary_metrics([human[x.id] for x in picked], [_judge(x.requirements) for x in picked])
        got = report["metrics"][cat]
        assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (want.tp, want.fp, want.fn, want.tn), cat
        assert got["f1"] == pytest.approx(want.f1) and got["n"] == len(picked)
    assert report["metrics"]["Overall"]["n"] == 25 and report["invalid_leaves"] == 0
    assert 0 < report["metrics"]["Overall"]["tp"] < 25  # the scripted grades disagree on some leaves


def test_calibrate_names_bad_layouts(tmp_path: Path, capsys) -> None:
    assert main(["calibrate", str(tmp_path), "judge.context_window=null", "judge.tokenizer=null"]) == 2
    assert "klong-judge calibrate: error:" in capsys.readouterr().err
    ex = _example(tmp_path / "d")
    assert main(["calibrate", str(tmp_path / "d"), "judge.context_window=null", "judge.tokenizer=null"]) == 2
    assert "paper of example stochastic-interpolants/0 not found" in capsys.readouterr().err
    raw = json.loads((ex / "grading" / "expected_result.json").read_text())
    raw["sub_tasks"][0]["sub_tasks"] = []
    raw["sub_tasks"][0]["score"] = 0.5
    (ex / "grading" / "expected_result.json").write_text(json.dumps(raw))
    assert main(["calibrate", str(tmp_path / "d"), "--papers", str(TASKS), "judge.context_window=null",
                 "judge.tokenizer=null"]) == 2  # fmt: skip
    assert "'score' must be 0 or 1" in capsys.readouterr().err

"""Judge calibration against human grades, computed as PaperBench's JudgeEval computes it.

Source followed: openai/preparedness ``project/paperbench/paperbench/judge/judge_eval/evaluate.py``
(``calculate_judge_scores``, ``compute_metrics``: scikit-learn accuracy and macro precision / recall / F1 with
zero_division=0) and ``paperbench/scripts/run_judge_eval.py`` (leaf scores pooled over all examples, overall
and per task category; the human-graded tree is the rubric the judge grades).

Layout (PaperBench's ``data/judge_eval``): ``DATA/<paper_id>/<n>/submission/`` (the untarred submission.tar)
and ``DATA/<paper_id>/<n>/grading/expected_result.json`` (a graded rubric tree: every node carries ``score``,
leaves 0 or 1). Papers: ``PAPERS/<paper_id>/paper.md`` with optional ``addendum.md`` and ``judge.addendum.md``
(PaperBench's ``data/papers``, the default ``DATA/../papers``; the task folders of this project have it too).

Dataflow: examples -> each graded by the judge (eval priority) -> (predicted, human) pairs of the leaves the
judge graded validly (invalid leaves are counted and left out, as PaperBench does) -> metrics per category and
overall, with the confusion counts. Macro averages run over the labels present in either list, as
scikit-learn's do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from klong_megatron.judge.rubric import CATEGORIES, TaskNode, rubric_from_dict

REFERENCE = {
    "o3-mini-high (PaperBench paper)": {
        "Overall": 0.827,
        "Code Development": 0.720,
        "Code Execution": 0.822,
        "Result Analysis": 0.945,
    },
    "random": {"Overall": 0.504},
}
"""Macro-F1 figures PaperBench reports for JudgeEval, to compare a judge model with."""
_GRADED_KEYS = ("score", "valid_score", "explanation", "judge_metadata")


@dataclass(frozen=True)
class Example:
    """One human-graded submission: ``expected`` maps every leaf id to the human grade (0 or 1)."""

    id: str
    submission: Path
    rubric: TaskNode
    expected: dict[str, int]
    paper: str
    addendum: str
    judge_addendum: str


def graded_tree(data: dict[str, Any], source: str) -> tuple[TaskNode, dict[str, int]]:
    """(rubric, human leaf grades) from a PaperBench graded tree (``GradedTaskNode.to_dict`` layout)."""
    expected: dict[str, int] = {}

    def strip(node: dict[str, Any], path: str) -> dict[str, Any]:
        subs = node.get("sub_tasks") or []
        if not subs:
            score = node.get("score")
            if score not in (0, 1) or isinstance(score, bool):
                raise ValueError(f"{source}: leaf {node.get('id')!r} at {path}: 'score' must be 0 or 1, got {score!r}")
            expected[node["id"]] = int(score)
        out = {k: v for k, v in node.items() if k not in _GRADED_KEYS}
        out["sub_tasks"] = [strip(c, f"{path}.sub_tasks[{i}]") for i, c in enumerate(subs)]
        return out

    return rubric_from_dict(strip(data, "$"), source), expected


def load_examples(data_dir: str | Path, papers_dir: str | Path | None = None) -> list[Example]:
    """Every ``<paper_id>/<n>`` example under ``data_dir``; ValueError naming what is missing."""
    data_dir = Path(data_dir)
    papers = Path(papers_dir) if papers_dir is not None else data_dir.parent / "papers"
    found = sorted(data_dir.glob("*/*/grading/expected_result.json"))
    if not found:
        raise ValueError(f"{data_dir}: no <paper_id>/<n>/grading/expected_result.json (PaperBench judge_eval layout)")
    out = []
    for path in found:
        example_dir, paper_id = path.parents[1], path.parents[2].name
        sub = example_dir / "submission"
        if not sub.is_dir():
            raise ValueError(f"{example_dir}: no submission/ directory (untar submission.tar there first)")
        paper_md = papers / paper_id / "paper.md"
        if not paper_md.is_file():
            raise ValueError(f"{paper_md}: paper of example {paper_id}/{example_dir.name} not found (--papers)")
        tree, expected = graded_tree(json.loads(path.read_text()), str(path))
        texts = [(papers / paper_id / n) for n in ("addendum.md", "judge.addendum.md")]
        add, jadd = (p.read_text() if p.is_file() else "" for p in texts)
        out.append(Example(f"{paper_id}/{example_dir.name}", sub, tree, expected, paper_md.read_text(), add, jadd))
    return out


@dataclass(frozen=True)
class Metrics:
    """Binary-classification metrics of judge (predicted) against human (true) leaf grades."""

    n: int
    positives: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    tn: int


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> Metrics:
    """Accuracy and macro precision / recall / F1 over the labels present (scikit-learn, zero_division=0)."""
    pairs = list(zip(y_true, y_pred, strict=True))
    tp = sum(t == 1 and p == 1 for t, p in pairs)
    fp = sum(t == 0 and p == 1 for t, p in pairs)
    fn = sum(t == 1 and p == 0 for t, p in pairs)
    tn = sum(t == 0 and p == 0 for t, p in pairs)
    per_label = []
    for hit, false_pos, false_neg, present in ((tp, fp, fn, 1), (tn, fn, fp, 0)):
        if present not in set(y_true) | set(y_pred):
            continue
        p = hit / (hit + false_pos) if hit + false_pos else 0.0
        r = hit / (hit + false_neg) if hit + false_neg else 0.0
        per_label.append((p, r, 2 * p * r / (p + r) if p + r else 0.0))
    k = len(per_label) or 1
    n = len(pairs)
    return Metrics(
        n,
        tp + fn,
        (tp + tn) / n if n else 0.0,
        sum(x[0] for x in per_label) / k,
        sum(x[1] for x in per_label) / k,
        sum(x[2] for x in per_label) / k,
        tp,
        fp,
        fn,
        tn,
    )


def calibration_report(examples: Sequence[Example], predictions: Sequence[dict[str, float | None]]) -> dict[str, Any]:
    """Pooled metrics per category and overall; ``predictions[i]`` maps leaf id -> judge score (None: invalid)."""
    pooled: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in ("Overall", *CATEGORIES)}
    invalid = 0
    per_example = []
    for ex, pred in zip(examples, predictions, strict=True):
        cats = {leaf.id: leaf.task_category or "" for leaf in ex.rubric.leaves()}
        ys: tuple[list[int], list[int]] = ([], [])
        for leaf_id, score in pred.items():
            if score is None:
                invalid += 1
                continue
            for key in ("Overall", cats[leaf_id]):
                pooled[key][0].append(ex.expected[leaf_id])
                pooled[key][1].append(round(score))
            ys[0].append(ex.expected[leaf_id])
            ys[1].append(round(score))
        per_example.append({"id": ex.id, **asdict(binary_metrics(*ys))})
    metrics = {k: asdict(binary_metrics(*v)) for k, v in pooled.items() if v[0]}
    return {"metrics": metrics, "invalid_leaves": invalid, "examples": per_example, "reference_f1": REFERENCE}

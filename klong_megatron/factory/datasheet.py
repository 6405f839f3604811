"""The datasheet of a distillation run: what was attempted, what was kept and why, what it cost.

Dataflow: graded attempt records + recorded failures + rejection-sampling decisions (+ the kept
trajectories' length in the student's tokens) -> :func:`build_datasheet` (a JSON-able dict) ->
:func:`render_markdown`. Contents: papers, attempts (planned / graded / failed / pending / kept), the
rejection reasons, per-paper rows, failures with their reasons, histograms (score of all and of the kept
attempts, turns, teacher completion tokens, student tokens) and the cost in tokens (teacher prompt +
completion as the endpoint reported them; judge prompt + completion of the grading calls made now).

Pure: no I/O. Histograms: scores in tenths of [0, 1] (1.0 in the last bin); counts in power-of-two bins
``[0, 1), [1, 2), [2, 4), ...``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from klong_megatron.factory.select import REASONS, Decision


def score_histogram(values: list[float]) -> dict[str, list]:
    """Counts in ten bins of [0, 1]: ``edges`` [11], ``counts`` [10]."""
    counts = [0] * 10
    for v in values:
        counts[min(max(int(v * 10), 0), 9)] += 1
    return {"edges": [round(i / 10, 1) for i in range(11)], "counts": counts}


def count_histogram(values: list[int]) -> dict[str, list]:
    """Counts in power-of-two bins: ``edges`` [0, 1, 2, 4, ...] up to the first edge above the maximum."""
    edges = [0, 1]
    while values and edges[-1] <= max(values):
        edges.append(edges[-1] * 2)
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[next(i for i in range(len(counts)) if v < edges[i + 1])] += 1
    return {"edges": edges, "counts": counts}


def _short(err: str) -> str:
    return err.split(":", 1)[0].strip() or "error"


def build_datasheet(
    tasks: list[str],
    samples: int,
    graded: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    decisions: list[Decision],
    *,
    student_tokens: dict[str, int] | None = None,
    settings: dict[str, Any] | None = None,
    last_run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The datasheet as a JSON-able dict (see the module docstring). ``last_run``: the runner's counters and
    summed times of the run that wrote it (a resumed run counts only its own work)."""
    meta = {r["id"]: r.get("meta") or {} for r in graded}
    kept = [d for d in decisions if d.kept]
    planned = len(tasks) * samples
    per_paper = []
    for t in tasks:
        scores = [d.score for d in decisions if d.task == t]
        per_paper.append({"task": t, "graded": len(scores), "failed": sum(f["task"] == t for f in failures),
                          "kept": sum(d.kept for d in kept if d.task == t), "best_score": max(scores, default=None),
                          "mean_score": round(sum(scores) / len(scores), 4) if scores else None})  # fmt: skip
    tok = {"teacher_prompt": 0, "teacher_completion": 0, "judge_prompt": 0, "judge_completion": 0, "judge_calls": 0}
    for m in meta.values():
        tok["teacher_prompt"] += int(m.get("prompt_tokens") or 0)
        tok["teacher_completion"] += int(m.get("tokens") or 0)
        ju = m.get("judge_token_usage") or {}
        tok["judge_prompt"] += int(ju.get("prompt_tokens") or 0)
        tok["judge_completion"] += int(ju.get("completion_tokens") or 0)
        tok["judge_calls"] += int(ju.get("calls") or 0)
    total = tok["teacher_prompt"] + tok["teacher_completion"] + tok["judge_prompt"] + tok["judge_completion"]
    tok.update(total=total, per_kept=round(total / len(kept), 1) if kept else None)
    kept_meta = [meta[d.id] for d in kept]
    hist = {
        "score_all": score_histogram([d.score for d in decisions]),
        "score_kept": score_histogram([d.score for d in kept]),
        "turns_all": count_histogram([int(m.get("turns") or 0) for m in meta.values()]),
        "turns_kept": count_histogram([int(m.get("turns") or 0) for m in kept_meta]),
        "teacher_tokens_kept": count_histogram([int(m.get("tokens") or 0) for m in kept_meta]),
    }
    if student_tokens is not None:
        hist["student_tokens_kept"] = count_histogram(list(student_tokens.values()))
    reasons = Counter(d.reason for d in decisions)
    return {
        "settings": settings or {},
        "papers": len(tasks),
        "attempts": {
            "planned": planned,
            "graded": len(graded),
            "failed": len(failures),
            "pending": planned - len(graded) - len(failures),
            "kept": len(kept),
        },  # fmt: skip
        "decisions": {r: reasons.get(r, 0) for r in REASONS},
        "finish_reasons": dict(Counter(str(m.get("finish_reason") or "") for m in meta.values())),
        "per_paper": per_paper,
        "failures": [{"id": f["id"], "errors": f.get("errors") or []} for f in failures],
        "failure_kinds": dict(Counter(_short((f.get("errors") or ["error"])[-1]) for f in failures)),
        "histograms": hist,
        "cost_tokens": tok,
        "student_tokens_kept": sum(student_tokens.values()) if student_tokens is not None else None,
        "last_run": last_run or {},
    }


def _bars(h: dict[str, list], label: str, fmt: str = "{}", closed: bool = False) -> list[str]:
    top = max(h["counts"], default=0) or 1
    lines = [f"| {label} | count | |", "|---|---:|---|"]
    for i, c in enumerate(h["counts"]):
        lo, hi = h["edges"][i], h["edges"][i + 1]
        close = "]" if closed and i == len(h["counts"]) - 1 else ")"
        lines.append(f"| [{fmt.format(lo)}, {fmt.format(hi)}{close} | {c} | {'#' * round(20 * c / top)} |")
    return lines + [""]


def render_markdown(sheet: dict[str, Any]) -> str:
    """The datasheet as Markdown (tables and ASCII histograms)."""
    a, tok = sheet["attempts"], sheet["cost_tokens"]
    lines = ["# Distillation datasheet", ""]
    lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in sheet["settings"].items()), ""]
    lines += [f"{sheet['papers']} papers; attempts planned {a['planned']}, graded {a['graded']}, failed {a['failed']}, "
              f"pending {a['pending']}; **kept {a['kept']}**.", ""]  # fmt: skip
    lines += ["| decision | attempts |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sheet["decisions"].items()]
    lines += ["", "| paper | graded | failed | kept | best | mean |", "|---|---:|---:|---:|---:|---:|"]
    for p in sheet["per_paper"]:
        lines.append(f"| {p['task']} | {p['graded']} | {p['failed']} | {p['kept']} | {p['best_score']} | "
                     f"{p['mean_score']} |")  # fmt: skip
    lines += ["", "## Cost in tokens", "", "| | prompt | completion |", "|---|---:|---:|"]
    judge = f"judge ({tok['judge_calls']} calls)"
    lines += [f"| teacher | {tok['teacher_prompt']} | {tok['teacher_completion']} |",
              f"| {judge} | {tok['judge_prompt']} | {tok['judge_completion']} |", ""]  # fmt: skip
    lines += [f"Total {tok['total']} tokens; {tok['per_kept']} per kept trajectory.", ""]
    if sheet["student_tokens_kept"] is not None:
        lines += [f"Kept trajectories: {sheet['student_tokens_kept']} tokens in the student's chat template.", ""]
    if sheet["last_run"]:
        lines += ["Last run: " + ", ".join(f"{k}={v:g}" for k, v in sheet["last_run"].items()), ""]
    lines += ["## Histograms", ""]
    for name, h in sheet["histograms"].items():
        label = name.split("_")[0]
        lines += [f"### {name}", ""] + _bars(h, label, "{:g}", closed=label == "score")
    if sheet["failures"]:
        lines += ["## Failures", ""] + [f"- {f['id']}: {' | '.join(f['errors'])}" for f in sheet["failures"]] + [""]
    return "\n".join(lines)

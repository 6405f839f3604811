"""klong-eval's report: per-task and per-category means +- standard error, JSON and one HTML file.

Dataflow: graded trajectories (``meta``: task, reward, reward_excluded, judge_per_category,
blacklist_flagged, reproduce, grade_json) + the tasks' rubrics -> :func:`summarize` (a JSON-able dict)
-> :func:`format_table` (console), ``report.json``, :func:`render_html` (self-contained: inline CSS,
no scripts or external files; per task its score, category scores, every leaf's grade with the
judge's explanation, and each sample's transcript in the same file, linked by anchor).

Means are over the samples that count: excluded samples (judge invalid share above the limit) are
listed but left out; blacklist-flagged samples count with score 0. Standard error = sample standard
deviation / sqrt(n) (0 for n = 1).
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

from klong_megatron.data.trajectory import Trajectory
from klong_megatron.tasks.paperbench import PaperTask


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); (nan, nan) for no values."""
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def _counts(trajs: list[Trajectory]) -> list[Trajectory]:
    return [t for t in trajs if not t.meta.get("reward_excluded")]


def summarize(trajs: list[Trajectory], tasks: dict[str, PaperTask]) -> dict[str, Any]:
    """Per-task and per-category means +- stderr, overall mean, and per-sample rows."""
    by_task: dict[str, list[Trajectory]] = {t: [] for t in tasks}
    for t in trajs:
        by_task.setdefault(str(t.meta["task"]), []).append(t)
    per_task, cats_all = {}, {}
    for name, ts in by_task.items():
        ok = _counts(ts)
        m, se = mean_stderr([float(t.meta["reward"]) for t in ok])
        cats: dict[str, list[float]] = {}
        for t in ok:
            for c, v in t.meta.get("judge_per_category", {}).items():
                cats.setdefault(c, []).append(float(v))
                cats_all.setdefault(c, []).append(float(v))
        per_task[name] = {
            "mean": m, "stderr": se, "n": len(ok), "samples": len(ts),
            "excluded": sum(bool(t.meta.get("reward_excluded")) for t in ts),
            "flagged": sum(bool(t.meta.get("blacklist_flagged")) for t in ts),
            "categories": {c: dict(zip(("mean", "stderr"), mean_stderr(v), strict=True)) for c, v in cats.items()},
        }  # fmt: skip
    overall = mean_stderr([float(t.meta["reward"]) for t in _counts(trajs)])
    return {
        "overall": {"mean": overall[0], "stderr": overall[1], "n": len(_counts(trajs)), "samples": len(trajs)},
        "tasks": per_task,
        "categories": {c: dict(zip(("mean", "stderr"), mean_stderr(v), strict=True)) for c, v in cats_all.items()},
        "samples": [_sample_row(t) for t in sorted(trajs, key=lambda t: t.id)],
    }


def _sample_row(t: Trajectory) -> dict[str, Any]:
    m = t.meta
    return {k: m.get(k) for k in ("task", "sample", "reward", "reward_excluded", "judge_invalid_frac",
                                  "blacklist_flagged", "finish_reason", "turns", "duration_s", "reproduce",
                                  "grade_json")} | {"id": t.id}  # fmt: skip


def _pm(d: dict[str, Any]) -> str:
    return "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.3f} +- {d['stderr']:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text tables: per task (mean +- stderr, n, excluded, flagged) and per category."""
    rows = [("task", "score", "n", "excluded", "flagged")]
    for name, d in summary["tasks"].items():
        rows.append((name, _pm(d), str(d["n"]), str(d["excluded"]), str(d["flagged"])))
    o = summary["overall"]
    rows.append(("ALL", _pm(o), str(o["n"]), "", ""))
    rows += [("", "", "", "", ""), ("category", "score", "", "", "")]
    rows += [(c, _pm(d), "", "", "") for c, d in summary["categories"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


MAX_MESSAGE_CHARS = 4000
"""Transcript messages longer than this keep their head and tail in the HTML report."""
_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}.s1{background:#dfd}
.s0{background:#fdd}.inv{background:#eee}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;margin:2px 0}
details{margin:.3em 0}.role{font-weight:bold}"""


def _leaf_rows(task: PaperTask, grade_json: str | None) -> str:
    grades = {}
    if grade_json and Path(grade_json).is_file():
        grades = json.loads(Path(grade_json).read_text()).get("leaves", {})
    out = ["<table><tr><th>requirement</th><th>category</th><th>weight</th><th>grade</th><th>judge</th></tr>"]
    for leaf in task.rubric.leaves():
        g = grades.get(leaf.id, {})
        valid, score = g.get("valid", False), g.get("score")
        cls = "inv" if not valid else ("s1" if score and score >= 0.5 else "s0")
        cells = [leaf.requirements, str(leaf.task_category), f"{leaf.weight:g}",
                 "invalid" if not valid else f"{score:g}", g.get("explanation", "")]  # fmt: skip
        out.append(f"<tr class={cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def _anchor(tid: str) -> str:
    return "t-" + re.sub(r"[^A-Za-z0-9_-]", "_", tid)


def _transcript(t: Trajectory, max_chars: int) -> str:
    parts = []
    for m in t.messages:
        text = m.content
        if len(text) > max_chars:
            text = text[: max_chars // 2] + "\n[...]\n" + text[-max_chars // 2 :]
        calls = "".join(f"\n-> {c.name}({c.arguments[:max_chars]})" for c in m.tool_calls)
        parts.append(f"<div><span class=role>{m.role}</span><pre>{html.escape(text + calls)}</pre></div>")
    return "".join(parts)


def _row(*cells: object) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _sample_html(t: Trajectory, task: PaperTask) -> str:
    m, rep = t.meta, t.meta.get("reproduce") or {}
    status = f" EXCLUDED (judge invalid share {m.get('judge_invalid_frac', 0):.0%})" if m.get("reward_excluded") else ""
    status += " FLAGGED (blacklist)" if m.get("blacklist_flagged") else ""
    run = f"exit {rep.get('exit_code')}, {rep.get('duration_s', 0):.0f} s" if rep else "not run"
    run += ", timed out" if rep.get("timed_out") else ""
    run += ", reproduce.sh missing" if rep.get("missing_script") else ""
    finish = html.escape(str(m.get("finish_reason")))
    return (
        f"<h3>sample {m.get('sample')}: score {float(m['reward']):.3f}{status}</h3>"
        f"<p>finish: {finish}, turns {m.get('turns')}, {m.get('duration_s', 0):.0f} s; reproduction: {run}"
        f" &middot; <a href='#{_anchor(t.id)}'>transcript</a></p>"
        f"<details><summary>leaf grades</summary>{_leaf_rows(task, m.get('grade_json'))}</details>"
    )


def render_html(
    summary: dict[str, Any], trajs: list[Trajectory], tasks: dict[str, PaperTask], *, title: str = "klong-eval"
) -> str:
    """One self-contained HTML page (no external resources)."""
    o = summary["overall"]
    h = [
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>Overall: <b>{_pm(o)}</b> over {o['n']} counted samples ({o['samples']} graded).</p>",
        "<h2>Tasks</h2><table>" + _row("<b>task</b>", "<b>score</b>", "<b>n</b>", "<b>excluded</b>", "<b>flagged</b>"),
    ]
    for name, d in summary["tasks"].items():
        link = f"<a href='#task-{_anchor(name)}'>{html.escape(name)}</a>"
        h.append(_row(link, _pm(d), d["n"], d["excluded"], d["flagged"]))
    h.append("</table><h2>Categories</h2><table>")
    h += [_row(html.escape(c), _pm(d)) for c, d in summary["categories"].items()]
    h.append("</table>")
    ordered = sorted(trajs, key=lambda t: t.id)
    for name, task in tasks.items():
        d = summary["tasks"].get(name, {})
        cats = ", ".join(f"{html.escape(c)} {_pm(v)}" for c, v in d.get("categories", {}).items())
        h.append(f"<h2 id='task-{_anchor(name)}'>{html.escape(name)}: {html.escape(task.title)}</h2>")
        h.append(f"<p>score {_pm(d) if d else 'n/a'}; {cats}</p>")
        h += [_sample_html(t, task) for t in ordered if t.meta["task"] == name]
    h.append("<h2>Transcripts</h2>")
    for t in ordered:
        body = _transcript(t, MAX_MESSAGE_CHARS)
        h.append(f"<details id='{_anchor(t.id)}'><summary>{html.escape(t.id)}</summary>{body}</details>")
    h.append("</body></html>")
    return "\n".join(h)


def write_reports(
    out: str | Path, trajs: list[Trajectory], tasks: dict[str, PaperTask], extra: dict[str, Any]
) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` to ``out``; returns the summary."""
    out = Path(out)
    summary = summarize(trajs, tasks) | extra
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "report.html").write_text(render_html(summary, trajs, tasks))
    return summary

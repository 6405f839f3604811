"""Rubric statistics: generated rubrics beside real PaperBench ones (depth, size, category mix).

``rubric_stats(tree)`` -> one paper's numbers; ``compare_table(generated, reference)`` -> a Markdown table of the
means of both sets (the factory report and benchmarks/factory_throughput.py print it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from klong_megatron.judge.rubric import CATEGORIES, TaskNode, load_rubric


def rubric_stats(tree: TaskNode) -> dict[str, float]:
    """depth (root = 0 edges), nodes, leaves, mean children of a non-leaf, and each category's share of leaves."""
    leaves = list(tree.leaves())
    inner = [n for _, n in tree.walk() if not n.is_leaf]
    cats = Counter(leaf.task_category for leaf in leaves)
    out = {
        "depth": float(tree.depth()),
        "nodes": float(sum(1 for _ in tree.walk())),
        "leaves": float(len(leaves)),
        "branching": sum(len(n.sub_tasks) for n in inner) / max(len(inner), 1),
    }
    for c in CATEGORIES:
        out[f"share {c}"] = cats[c] / max(len(leaves), 1)
    return out


def load_dir(path: str | Path) -> list[TaskNode]:
    """Every ``*.json`` rubric under ``path`` (sorted), validated."""
    files = sorted(Path(path).rglob("*.json"))
    if not files:
        raise FileNotFoundError(f"no rubric *.json under {path}")
    return [load_rubric(f) for f in files]


def mean_stats(trees: list[TaskNode]) -> dict[str, float]:
    rows = [rubric_stats(t) for t in trees]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def compare_table(generated: list[TaskNode], reference: list[TaskNode] | None = None) -> str:
    """Markdown table: one row per statistic, the mean over ``generated`` (and over ``reference``)."""
    gen, ref = mean_stats(generated), mean_stats(reference or [])
    head = f"| statistic | generated (n={len(generated)}) |" + (f" PaperBench (n={len(reference)}) |" if ref else "")
    lines = [head, "|---|---:|" + ("---:|" if ref else "")]
    for key in gen or ref:
        fmt = "{:.0%}" if key.startswith("share") else "{:.1f}"
        row = f"| {key} | {fmt.format(gen[key]) if gen else '-'} |"
        lines.append(row + (f" {fmt.format(ref[key])} |" if ref else ""))
    return "\n".join(lines)

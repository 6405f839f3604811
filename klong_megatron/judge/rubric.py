"""PaperBench rubric trees: load / validate / save, score aggregation, and tree transforms.

Dataflow: ``rubric.json`` -> :func:`load_rubric` (validated, immutable :class:`TaskNode` tree) ->
optional transforms (:func:`code_only`, :func:`zero_weight`, :func:`collapse_deep`) -> graders give
each leaf a score in [0, 1] -> :func:`aggregate` (weighted mean of children, all the way up).

Format (PaperBench ``TaskNode``): ``id``, ``requirements``, ``weight``, ``sub_tasks``, ``task_category``
(one of :data:`CATEGORIES`, on leaves only), ``finegrained_task_category`` (leaves only). Our extension:
a leaf may carry ``check``, a shell command run in the submission's sandbox (exit code 0 scores 1).

Pure: no I/O beyond reading/writing the JSON file, no network. Trees are immutable; transforms return
new trees and keep node ids, so per-leaf scores stay comparable across transforms.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from klong_megatron.errors import UserError

CATEGORIES = ("Code Development", "Code Execution", "Result Analysis")
_KEYS = {"id", "requirements", "weight", "sub_tasks", "task_category", "finegrained_task_category", "check"}


class RubricError(UserError):
    """A rubric that breaks the format; the message names the source, node id and JSON path."""


@dataclass(frozen=True)
class TaskNode:
    """One node of a rubric tree. A leaf has no sub_tasks and a task_category; a non-leaf has neither."""

    id: str
    requirements: str
    weight: float
    sub_tasks: tuple[TaskNode, ...] = ()
    task_category: str | None = None
    finegrained_task_category: str | None = None
    check: str | None = None

    @property
    def is_leaf(self) -> bool:
        return not self.sub_tasks

    def leaves(self) -> Iterator[TaskNode]:
        """Leaves in depth-first (document) order."""
        if self.is_leaf:
            yield self
        for child in self.sub_tasks:
            yield from child.leaves()

    def walk(self, path: tuple[TaskNode, ...] = ()) -> Iterator[tuple[tuple[TaskNode, ...], TaskNode]]:
        """(ancestors from the root, node) for every node, depth-first."""
        yield path, self
        for child in self.sub_tasks:
            yield from child.walk((*path, self))

    def find(self, node_id: str) -> TaskNode:
        for _, node in self.walk():
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def prior_nodes(self, node_id: str, max_prior_nodes: int | None = None) -> list[TaskNode]:
        """Context for grading ``node_id`` (this node is the root): its ancestors, the preceding siblings of it
        and of every ancestor, top-down, without the node itself; the last ``max_prior_nodes`` when given.

        PaperBench's ``TaskNode.get_prior_nodes`` (paperbench/rubric/tasks.py).
        """
        path = self._path_to(node_id)
        if path is None:
            raise KeyError(node_id)
        out: list[TaskNode] = [self]
        for parent, node in zip(path, path[1:], strict=False):
            idx = next(i for i, c in enumerate(parent.sub_tasks) if c.id == node.id)
            out.extend(parent.sub_tasks[: idx + 1])
        out = out[:-1] if len(path) > 1 else []
        return out[-max_prior_nodes:] if max_prior_nodes else out

    def _path_to(self, node_id: str) -> list[TaskNode] | None:
        if self.id == node_id:
            return [self]
        for child in self.sub_tasks:
            if (sub := child._path_to(node_id)) is not None:
                return [self, *sub]
        return None

    def depth(self) -> int:
        """0 for a single leaf."""
        return 0 if self.is_leaf else 1 + max(c.depth() for c in self.sub_tasks)


# ---------------------------------------------------------------- parsing, validation, saving


def rubric_from_dict(data: Any, source: str = "<rubric>") -> TaskNode:
    """Build and validate a tree from PaperBench JSON data; raises :class:`RubricError` naming node and path."""
    return _parse(data, source, "$", {})


def _parse(data: Any, source: str, path: str, seen: dict[str, str]) -> TaskNode:
    where = f"{source}: node at {path}"
    if not isinstance(data, dict):
        raise RubricError(f"{where}: expected an object, got {type(data).__name__}")
    node_id = data.get("id")
    if not isinstance(node_id, str) or not node_id:
        raise RubricError(f"{where}: 'id' must be a non-empty string, got {node_id!r}")
    where = f"{source}: node {node_id!r} at {path}"
    if node_id in seen:
        raise RubricError(f"{where}: duplicate id (first at {seen[node_id]})")
    seen[node_id] = path
    if unknown := sorted(set(data) - _KEYS):
        raise RubricError(f"{where}: unknown field(s) {unknown}")
    if not isinstance(data.get("requirements"), str):
        raise RubricError(f"{where}: 'requirements' must be a string")
    weight = data.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        raise RubricError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
    subs = data.get("sub_tasks", [])
    if not isinstance(subs, list):
        raise RubricError(f"{where}: 'sub_tasks' must be a list")
    children = tuple(_parse(c, source, f"{path}.sub_tasks[{i}]", seen) for i, c in enumerate(subs))
    cat, fine, check = data.get("task_category"), data.get("finegrained_task_category"), data.get("check")
    if children:
        for name, value in (("task_category", cat), ("finegrained_task_category", fine), ("check", check)):
            if value is not None:
                raise RubricError(f"{where}: a non-leaf node must not have {name!r} (got {value!r})")
    else:
        if cat not in CATEGORIES:
            raise RubricError(f"{where}: a leaf needs 'task_category' in {list(CATEGORIES)}, got {cat!r}")
        if fine is not None and not isinstance(fine, str):
            raise RubricError(f"{where}: 'finegrained_task_category' must be a string or null")
        if check is not None and (not isinstance(check, str) or not check.strip()):
            raise RubricError(f"{where}: 'check' must be a non-empty shell command string")
    return TaskNode(node_id, data["requirements"], weight, children, cat, fine, check)


def load_rubric(path: str | Path) -> TaskNode:
    """Read and validate a ``rubric.json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RubricError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return rubric_from_dict(data, str(path))


def rubric_to_dict(node: TaskNode) -> dict[str, Any]:
    """PaperBench JSON layout (same key order); ``check`` only where present."""
    out: dict[str, Any] = {
        "id": node.id,
        "requirements": node.requirements,
        "weight": node.weight,
        "sub_tasks": [rubric_to_dict(c) for c in node.sub_tasks],
        "task_category": node.task_category,
        "finegrained_task_category": node.finegrained_task_category,
    }
    if node.check is not None:
        out["check"] = node.check
    return out


def save_rubric(node: TaskNode, path: str | Path) -> None:
    Path(path).write_text(json.dumps(rubric_to_dict(node), indent=4) + "\n")


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Aggregate:
    """Result of :func:`aggregate`: the root score, every node's score, and leaves with no score (counted 0)."""

    score: float
    node_scores: dict[str, float] = field(default_factory=dict)
    missing: tuple[str, ...] = ()


def aggregate(tree: TaskNode, leaf_scores: Mapping[str, float]) -> Aggregate:
    """Weighted mean of children at every node; a node whose children weigh 0 in total scores 0.

    ``leaf_scores`` maps leaf id -> score in [0, 1]. Missing leaves count as 0 and are listed in
    ``missing``; an id that is not a leaf of ``tree`` or a score outside [0, 1] is a ValueError.
    """
    leaf_ids = {leaf.id for leaf in tree.leaves()}
    if unknown := sorted(set(leaf_scores) - leaf_ids):
        raise ValueError(f"scores given for ids that are not leaves of rubric {tree.id!r}: {unknown[:5]}")
    for leaf_id, s in leaf_scores.items():
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"leaf {leaf_id!r}: score must be in [0, 1], got {s!r}")
    node_scores: dict[str, float] = {}
    missing: list[str] = []

    def visit(node: TaskNode) -> float:
        if node.is_leaf:
            if node.id not in leaf_scores:
                missing.append(node.id)
            s = float(leaf_scores.get(node.id, 0.0))
        else:
            child_scores = [visit(c) for c in node.sub_tasks]
            total = sum(c.weight for c in node.sub_tasks)
            s = sum(c.weight * x for c, x in zip(node.sub_tasks, child_scores, strict=True)) / total if total else 0.0
        node_scores[node.id] = s
        return s

    root = visit(tree)
    return Aggregate(root, node_scores, tuple(missing))


def score(tree: TaskNode, leaf_scores: Mapping[str, float]) -> float:
    """Root score in [0, 1] (see :func:`aggregate` for the rules and the list of missing leaves)."""
    return aggregate(tree, leaf_scores).score


def category_scores(tree: TaskNode, leaf_scores: Mapping[str, float]) -> dict[str, float]:
    """Score of the tree restricted to each task_category present (the other leaves dropped)."""
    out = {}
    for cat in CATEGORIES:
        sub = filter_leaves(tree, lambda leaf, cat=cat: leaf.task_category == cat)
        if sub is not None:
            out[cat] = score(sub, {k: v for k, v in leaf_scores.items() if k in {x.id for x in sub.leaves()}})
    return out


@dataclass(frozen=True)
class ValidScore:
    """Result of :func:`valid_score`: the score over the valid leaves and the share of the rubric left out."""

    score: float
    per_category: dict[str, float]
    node_scores: dict[str, float]
    invalid: tuple[str, ...]
    invalid_frac: float


def valid_score(tree: TaskNode, leaf_scores: Mapping[str, float]) -> ValidScore:
    """The rubric score over the leaves that have a score, the others left out, never counted 0.

    The tree is pruned to the scored leaves (a parent left without scored leaves goes too) and scored as
    usual, so at every node the weights of the children that remain are renormalised among themselves.
    ``invalid_frac`` is the share of the full tree's score (:func:`leaf_weights`) carried by the unscored
    leaves: 0 when every leaf is scored, 1 when none is (then ``score`` is 0 and meaningless).
    """
    shares = leaf_weights(tree)
    invalid = tuple(leaf.id for leaf in tree.leaves() if leaf.id not in leaf_scores)
    pruned = filter_leaves(tree, lambda leaf: leaf.id in leaf_scores)
    if pruned is None:
        return ValidScore(0.0, {}, {}, invalid, 1.0 if invalid else 0.0)
    agg = aggregate(pruned, leaf_scores)
    frac = sum(shares[i] for i in invalid)
    total = sum(shares.values())
    return ValidScore(
        agg.score, category_scores(pruned, leaf_scores), agg.node_scores, invalid, frac / total if total else 0.0
    )


def leaf_weights(tree: TaskNode) -> dict[str, float]:
    """Share of the root score each leaf carries (product of normalised weights on its path; sums to <= 1)."""
    out: dict[str, float] = {}

    def visit(node: TaskNode, share: float) -> None:
        if node.is_leaf:
            out[node.id] = share
            return
        total = sum(c.weight for c in node.sub_tasks)
        for c in node.sub_tasks:
            visit(c, share * c.weight / total if total else 0.0)

    visit(tree, 1.0)
    return out


# ---------------------------------------------------------------- transforms


def filter_leaves(tree: TaskNode, keep: Callable[[TaskNode], bool]) -> TaskNode | None:
    """Keep the leaves for which ``keep`` is true; drop parents left without children (None if all go)."""
    if tree.is_leaf:
        return tree if keep(tree) else None
    children = tuple(c for c in (filter_leaves(s, keep) for s in tree.sub_tasks) if c is not None)
    return replace(tree, sub_tasks=children) if children else None


def code_only(tree: TaskNode) -> TaskNode:
    """Only the Code Development leaves (PaperBench's Code-Dev variant); ValueError if there are none."""
    out = filter_leaves(tree, lambda leaf: leaf.task_category == "Code Development")
    if out is None:
        raise ValueError(f"rubric {tree.id!r} has no 'Code Development' leaves")
    return out


def zero_weight(tree: TaskNode, finegrained_category: str) -> TaskNode:
    """Give weight 0 to the leaves of ``finegrained_category``; parents keep their weights.

    PaperBench's ``zero_weight_by_category`` (paperbench/rubric/tasks.py, used by ``resources_provided``):
    only leaf weights change, so a parent whose children all weigh 0 scores 0 with its own weight.
    """
    if tree.is_leaf:
        return replace(tree, weight=0) if tree.finegrained_task_category == finegrained_category else tree
    return replace(tree, sub_tasks=tuple(zero_weight(c, finegrained_category) for c in tree.sub_tasks))


def collapse_deep(tree: TaskNode, max_depth: int) -> TaskNode:
    """Turn every node at depth ``max_depth`` (root = 0) that has sub_tasks into one leaf.

    The new leaf keeps the node's id and weight; its requirements are the node's requirements followed
    by an indented outline of the subtree; its categories are those carrying the largest share of the
    subtree's score. ``check`` commands inside the subtree are dropped (the leaf is graded as a whole).
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")

    def visit(node: TaskNode, depth: int) -> TaskNode:
        if node.is_leaf:
            return node
        if depth < max_depth:
            return replace(node, sub_tasks=tuple(visit(c, depth + 1) for c in node.sub_tasks))
        return _collapse(node)

    return visit(tree, 0)


def _collapse(node: TaskNode) -> TaskNode:
    shares = leaf_weights(node)
    by_cat: dict[str, float] = {}
    by_fine: dict[str | None, float] = {}
    for leaf in node.leaves():
        by_cat[leaf.task_category or ""] = by_cat.get(leaf.task_category or "", 0.0) + shares[leaf.id]
        by_fine[leaf.finegrained_task_category] = by_fine.get(leaf.finegrained_task_category, 0.0) + shares[leaf.id]
    lines = [node.requirements, "All of the following hold:"]
    for ancestors, sub in node.walk():
        if sub is not node:
            lines.append("  " * (len(ancestors) - 1) + f"- {sub.requirements}")
    return TaskNode(
        id=node.id,
        requirements="\n".join(lines),
        weight=node.weight,
        task_category=max(by_cat, key=lambda c: by_cat[c]),
        finegrained_task_category=max(by_fine, key=lambda c: by_fine[c]) if by_fine else None,
    )

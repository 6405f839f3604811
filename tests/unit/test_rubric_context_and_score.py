"""Preceding criteria (PaperBench's get_prior_nodes) and the score over valid leaves only."""

from __future__ import annotations

import pytest

from klong_megatron.judge.rubric import TaskNode, rubric_from_dict, valid_score


def _tree() -> TaskNode:
    """PaperBench's docstring example (paperbench/rubric/tasks.py get_prior_nodes): A(B(D, E), C(F, G))."""

    def leaf(i: str, w: float = 1) -> dict:
        return {"id": i, "requirements": i, "weight": w, "sub_tasks": [], "task_category": "Code Development"}

    return rubric_from_dict(
        {"id": "A", "requirements": "A", "weight": 1, "sub_tasks": [
            {"id": "B", "requirements": "B", "weight": 1, "sub_tasks": [leaf("D"), leaf("E")]},
            {"id": "C", "requirements": "C", "weight": 3, "sub_tasks": [leaf("F"), leaf("G", 3)]},
        ]}
    )  # fmt: skip


def _ids(nodes: list[TaskNode]) -> list[str]:
    return [n.id for n in nodes]


def test_prior_nodes_are_ancestors_and_preceding_siblings_top_down() -> None:
    tree = _tree()
    assert _ids(tree.prior_nodes("G")) == ["A", "B", "C", "F"]  # PaperBench's own example
    assert _ids(tree.prior_nodes("D")) == ["A", "B"]
    assert _ids(tree.prior_nodes("E")) == ["A", "B", "D"]
    assert _ids(tree.prior_nodes("C")) == ["A", "B"]
    assert tree.prior_nodes("A") == []
    assert _ids(tree.prior_nodes("G", max_prior_nodes=2)) == ["C", "F"]  # the last ones, as PaperBench
    with pytest.raises(KeyError):
        tree.prior_nodes("nope")


def test_valid_score_renormalises_weights_over_the_valid_leaves() -> None:
    tree = _tree()
    every = valid_score(tree, {"D": 1.0, "E": 0.0, "F": 1.0, "G": 0.0})
    assert every.score == pytest.approx((1 * 0.5 + 3 * 0.25) / 4) and every.invalid_frac == 0.0
    # G (3/4 of C, C is 3/4 of the root) cannot be graded: C is F alone, the root keeps B and C
    part = valid_score(tree, {"D": 1.0, "E": 0.0, "F": 1.0})
    assert part.invalid == ("G",) and part.invalid_frac == pytest.approx(0.75 * 0.75)
    assert part.score == pytest.approx((1 * 0.5 + 3 * 1.0) / 4)
    assert part.node_scores["C"] == 1.0 and "G" not in part.node_scores
    # a whole subtree invalid: the root is B alone
    assert valid_score(tree, {"D": 1.0, "E": 1.0}).score == 1.0
    none = valid_score(tree, {})
    assert none.score == 0.0 and none.invalid_frac == 1.0 and none.per_category == {}


def test_an_invalid_leaf_of_weight_zero_costs_no_share() -> None:
    raw = {"id": "r", "requirements": "", "weight": 1, "sub_tasks": [
        {"id": "a", "requirements": "", "weight": 0, "sub_tasks": [], "task_category": "Code Development"},
        {"id": "b", "requirements": "", "weight": 1, "sub_tasks": [], "task_category": "Result Analysis"},
    ]}  # fmt: skip
    res = valid_score(rubric_from_dict(raw), {"b": 1.0})
    assert res.invalid == ("a",) and res.invalid_frac == 0.0 and res.score == 1.0
    assert res.per_category == {"Result Analysis": 1.0}

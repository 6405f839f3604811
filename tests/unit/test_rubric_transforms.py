"""Rubric transforms: code_only, zero_weight, collapse_deep (on the real PaperBench rubrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klong_megatron.judge.rubric import (
    code_only,
    collapse_deep,
    leaf_weights,
    load_rubric,
    rubric_from_dict,
    rubric_to_dict,
    score,
    zero_weight,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_rubrics"  # the real PaperBench rubrics
RUBRICS = sorted(DATA.glob("*.json"))
# Code Development leaves per file, counted in the JSON files: (leaves, code-dev leaves).
COUNTS = {
    "mechanistic-understanding": (96, 36),
    "semantic-self-consistency": (77, 50),
    "stochastic-interpolants": (69, 58),
}


def _raw_leaves(node: dict) -> list[dict]:
    return [node] if not node["sub_tasks"] else [x for c in node["sub_tasks"] for x in _raw_leaves(c)]


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.stem)
def test_code_only_keeps_exactly_the_code_development_leaves(path: Path) -> None:
    tree = load_rubric(path)
    raw_dev = [x["id"] for x in _raw_leaves(json.loads(path.read_text())) if x["task_category"] == "Code Development"]
    total, dev = COUNTS[path.name.removesuffix(".rubric.json")]
    assert len(list(tree.leaves())) == total
    out = code_only(tree)
    assert [leaf.id for leaf in out.leaves()] == raw_dev
    assert len(raw_dev) == dev
    assert all(node.sub_tasks or node.task_category for _, node in out.walk())  # no emptied parents
    assert score(out, {i: 1.0 for i in raw_dev}) == pytest.approx(1.0)
    rubric_from_dict(rubric_to_dict(out))  # still a valid rubric


def test_code_only_drops_parents_left_empty() -> None:
    raw = {
        "id": "r",
        "requirements": "",
        "weight": 1,
        "sub_tasks": [
            {"id": "a", "requirements": "", "weight": 1, "sub_tasks": [_leaf("x", "Code Execution")]},
            {"id": "b", "requirements": "", "weight": 1, "sub_tasks": [_leaf("y", "Code Development")]},
        ],
    }
    out = code_only(rubric_from_dict(raw))
    assert [c.id for c in out.sub_tasks] == ["b"]
    with pytest.raises(ValueError, match="no 'Code Development' leaves"):
        code_only(rubric_from_dict(raw["sub_tasks"][0]))


def _leaf(i: str, cat: str, fine: str | None = None, w: float = 1) -> dict:
    return {"id": i, "requirements": f"req {i}", "weight": w, "sub_tasks": [], "task_category": cat,
            "finegrained_task_category": fine}  # fmt: skip


def test_zero_weight_zeroes_only_the_leaves_as_paperbench_does() -> None:
    tree = load_rubric(DATA / "semantic-self-consistency.rubric.json")
    cat = "Dataset and Model Acquisition"
    dropped = {leaf.id for leaf in tree.leaves() if leaf.finegrained_task_category == cat}
    assert len(dropped) == 3
    out = zero_weight(tree, cat)
    shares = leaf_weights(out)
    assert all(shares[i] == 0 for i in dropped)
    assert {n.id: n.weight for _, n in out.walk() if not n.is_leaf} == {
        n.id: n.weight for _, n in tree.walk() if not n.is_leaf
    }  # parents keep their weights (paperbench/rubric/tasks.py zero_weight_by_category)
    others = {leaf.id: 1.0 for leaf in out.leaves() if leaf.id not in dropped}
    # in this rubric one parent holds only such leaves: it keeps its weight and scores 0, as in PaperBench
    assert score(out, others) == pytest.approx(sum(shares.values())) == pytest.approx(11 / 12)


def test_zero_weight_keeps_the_weight_of_a_parent_whose_children_all_weigh_zero() -> None:
    raw = {
        "id": "r",
        "requirements": "",
        "weight": 1,
        "sub_tasks": [
            {"id": "a", "requirements": "", "weight": 3, "sub_tasks": [_leaf("x", "Code Development", "Setup")]},
            _leaf("y", "Code Development", "Method"),
        ],
    }
    out = zero_weight(rubric_from_dict(raw), "Setup")
    assert out.sub_tasks[0].weight == 3 and out.sub_tasks[0].sub_tasks[0].weight == 0
    assert score(out, {"x": 1.0, "y": 1.0}) == pytest.approx(1 / 4)  # 'a' scores 0 (its children weigh 0)


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.stem)
@pytest.mark.parametrize("max_depth", [1, 2])
def test_collapse_deep_bounds_depth_and_keeps_ids_and_weights(path: Path, max_depth: int) -> None:
    tree = load_rubric(path)
    out = collapse_deep(tree, max_depth)
    assert out.depth() <= max_depth
    at_depth = [node for anc, node in tree.walk() if len(anc) == max_depth]
    new_leaves = {leaf.id: leaf for leaf in out.leaves()}
    for node in at_depth:
        leaf = new_leaves[node.id]
        assert leaf.weight == node.weight
        if not node.is_leaf:
            assert node.requirements in leaf.requirements
            assert all(x.requirements in leaf.requirements for x in node.leaves())
            assert leaf.task_category in {x.task_category for x in node.leaves()}
    rubric_from_dict(rubric_to_dict(out))


def test_collapse_deep_category_follows_the_heaviest_share() -> None:
    raw = {
        "id": "r",
        "requirements": "root",
        "weight": 1,
        "sub_tasks": [
            {
                "id": "a",
                "requirements": "group",
                "weight": 1,
                "sub_tasks": [_leaf("x", "Code Development", w=1), _leaf("y", "Result Analysis", w=3)],
            }
        ],
    }
    out = collapse_deep(rubric_from_dict(raw), 1)
    (leaf,) = out.leaves()
    assert leaf.id == "a" and leaf.task_category == "Result Analysis"
    assert collapse_deep(rubric_from_dict(raw), 0).is_leaf
    with pytest.raises(ValueError, match="max_depth"):
        collapse_deep(rubric_from_dict(raw), -1)


def test_prepare_rubric_applies_code_only_then_zero_weight_then_max_depth_as_paperbench() -> None:
    from klong_megatron.config.judge import JudgeConfig
    from klong_megatron.judge.factory import prepare_rubric

    tree = load_rubric(DATA / "stochastic-interpolants.rubric.json")
    cat = "Dataset and Model Acquisition"
    cfg = JudgeConfig(code_only=True, zero_weight_categories=[cat], use_checks=False)
    out = prepare_rubric(tree, cfg)
    assert out == zero_weight(code_only(tree), cat)  # paperbench/grade.py: code_only, then resources_provided
    assert all(leaf.task_category == "Code Development" for leaf in out.leaves())
    assert all(leaf.weight == 0 for leaf in out.leaves() if leaf.finegrained_task_category == cat)
    # max_depth counts the root as 1 (PaperBench's Judge.grade): 2 grades each child of the root as one leaf
    collapsed = prepare_rubric(tree, JudgeConfig(max_depth=2, use_checks=False))
    assert [leaf.id for leaf in collapsed.leaves()] == [c.id for c in tree.sub_tasks]
    assert prepare_rubric(tree, JudgeConfig(use_checks=False)) == tree

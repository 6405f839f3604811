"""Rubric trees: loading the real PaperBench rubrics, validation errors, exact weighted-mean scores."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_megatron.judge.rubric import (
    RubricError,
    TaskNode,
    aggregate,
    category_scores,
    load_rubric,
    rubric_from_dict,
    save_rubric,
    score,
)

# the real PaperBench rubrics, read from the shared data next to the repository (never copied into it)
RUBRICS = sorted((Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_rubrics").glob("*.json"))
MECH = next(p for p in RUBRICS if p.name.startswith("mechanistic"))
STOCH = next(p for p in RUBRICS if p.name.startswith("stochastic"))


def _raw_leaves(node: dict) -> list[dict]:
    return [node] if not node["sub_tasks"] else [x for c in node["sub_tasks"] for x in _raw_leaves(c)]


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.stem)
def test_real_rubric_loads_and_saves_identically(path: Path, tmp_path: Path) -> None:
    tree = load_rubric(path)
    raw = json.loads(path.read_text())
    assert [leaf.id for leaf in tree.leaves()] == [x["id"] for x in _raw_leaves(raw)]
    save_rubric(tree, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == raw


@pytest.mark.parametrize("path", RUBRICS, ids=lambda p: p.stem)
def test_all_ones_scores_one_and_nothing_scores_zero_with_every_leaf_missing(path: Path) -> None:
    tree = load_rubric(path)
    ids = [leaf.id for leaf in tree.leaves()]
    assert score(tree, dict.fromkeys(ids, 1.0)) == pytest.approx(1.0)
    agg = aggregate(tree, {})
    assert agg.score == 0.0
    assert list(agg.missing) == ids


def test_single_deep_leaf_scores_its_weight_share_on_mechanistic_rubric() -> None:
    # root children weigh 4+1+4+1+1+1+1+1+1+1+1+1 = 18; the first (weight 4) has 4 children of weight 1;
    # its first child has 2 leaves of weight 1: the first leaf alone gives 4/18 * 1/4 * 1/2 = 1/36.
    tree = load_rubric(MECH)
    assert score(tree, {"cfcf4e45-a955-4064-8c12-17bc3787bed7": 1.0}) == pytest.approx(1 / 36, abs=1e-15)


def test_weighted_result_leaf_and_half_scores_add_on_mechanistic_rubric() -> None:
    # second grandchild of the first child has leaf weights 1,1,1,1,1,1,2 (sum 8); the last (weight 2)
    # is Result Analysis: 4/18 * 1/4 * 2/8 = 1/72; adding the 1/36 leaf at 0.5 gives 1/72 + 1/72.
    tree = load_rubric(MECH)
    gc = tree.sub_tasks[0].sub_tasks[1]
    result_leaf = gc.sub_tasks[-1]
    assert result_leaf.task_category == "Result Analysis" and result_leaf.weight == 2
    scores = {result_leaf.id: 1.0}
    assert score(tree, scores) == pytest.approx(1 / 72, abs=1e-15)
    scores["cfcf4e45-a955-4064-8c12-17bc3787bed7"] = 0.5
    assert score(tree, scores) == pytest.approx(2 / 72, abs=1e-15)


def test_top_level_leaf_scores_its_share_on_stochastic_rubric() -> None:
    tree = load_rubric(STOCH)
    top_leaf = tree.sub_tasks[2]
    assert top_leaf.is_leaf  # root children weigh 2, 10, 1, 10
    assert score(tree, {top_leaf.id: 1.0}) == pytest.approx(1 / 23, abs=1e-15)


def test_per_category_score_uses_only_that_categorys_leaves() -> None:
    tree = load_rubric(MECH)
    dev = {leaf.id: 1.0 for leaf in tree.leaves() if leaf.task_category == "Code Development"}
    cats = category_scores(tree, dev)
    assert cats["Code Development"] == pytest.approx(1.0)
    assert cats["Code Execution"] == 0.0 and cats["Result Analysis"] == 0.0
    assert 0.0 < score(tree, dev) < 1.0


def _leaf(i: str, w: float = 1, cat: str | None = "Code Development") -> dict:
    return {"id": i, "requirements": f"req {i}", "weight": w, "sub_tasks": [], "task_category": cat}


def _node(i: str, subs: list, w: float = 1) -> dict:
    return {"id": i, "requirements": f"req {i}", "weight": w, "sub_tasks": subs}


def test_zero_total_weight_node_scores_zero() -> None:
    tree = rubric_from_dict(_node("r", [_node("a", [_leaf("x", 0), _leaf("y", 0)]), _leaf("z", 1)]))
    agg = aggregate(tree, {"x": 1.0, "y": 1.0, "z": 1.0})
    assert agg.node_scores["a"] == 0.0
    assert agg.score == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            _node("r", [_leaf("x"), _leaf("x")]),
            r"node 'x' at \$\.sub_tasks\[1\]: duplicate id \(first at \$\.sub_tasks\[0\]\)",
        ),
        (_node("r", [_node("a", [_leaf("x", -1)])]), r"node 'x' at \$\.sub_tasks\[0\]\.sub_tasks\[0\]: 'weight'"),
        (_node("r", [_leaf("x", cat=None)]), r"node 'x' at \$\.sub_tasks\[0\]: a leaf needs 'task_category'"),
        (_node("r", [_leaf("x", cat="Coding")]), r"node 'x'.*'Coding'"),
        ({**_node("r", [_leaf("x")]), "task_category": "Code Development"}, r"node 'r' at \$: a non-leaf"),
        ({**_node("r", [_leaf("x")]), "check": "true"}, r"node 'r' at \$: a non-leaf node must not have 'check'"),
        (_node("r", [{**_leaf("x"), "weigth": 1}]), r"node 'x'.*unknown field\(s\) \['weigth'\]"),
        (_node("r", [_leaf("x", w=True)]), r"node 'x'.*'weight' must be a finite number"),
        (_node("r", [{**_leaf("x"), "id": ""}]), r"node at \$\.sub_tasks\[0\]: 'id' must be a non-empty string"),
        (_node("r", [{**_leaf("x"), "check": "  "}]), r"node 'x'.*'check' must be a non-empty"),
    ],
)
def test_invalid_rubric_error_names_node_and_path(data: dict, match: str) -> None:
    with pytest.raises(RubricError, match=match):
        rubric_from_dict(data, "t.json")


def test_bad_json_file_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "rubric.json"
    p.write_text('{\n  "id": "r",\n  "weight": ,\n}')
    with pytest.raises(RubricError, match=r"rubric\.json:3:\d+: invalid JSON"):
        load_rubric(p)


def test_score_rejects_out_of_range_and_unknown_leaves() -> None:
    tree = rubric_from_dict(_node("r", [_leaf("x"), _leaf("y")]))
    with pytest.raises(ValueError, match="leaf 'x': score must be in"):
        score(tree, {"x": 1.5})
    with pytest.raises(ValueError, match=r"not leaves of rubric 'r': \['r'\]"):
        score(tree, {"r": 1.0})


# ---------------------------------------------------------------- property: matches exact rational arithmetic

_trees = st.recursive(
    st.integers(0, 5).map(lambda w: ("leaf", w)),
    lambda kids: st.tuples(st.integers(0, 5), st.lists(kids, min_size=1, max_size=4)).map(lambda t: ("node", *t)),
    max_leaves=20,
)


def _build(t: tuple, counter: list[int]) -> tuple[dict, list[str]]:
    counter[0] += 1
    i = f"n{counter[0]}"
    if t[0] == "leaf":
        return _leaf(i, t[1]), [i]
    children, ids = [], []
    for c in t[2]:
        d, sub = _build(c, counter)
        children.append(d)
        ids += sub
    return _node(i, children, t[1]), ids


def _exact(d: dict, s: dict[str, Fraction]) -> Fraction:
    if not d["sub_tasks"]:
        return s.get(d["id"], Fraction(0))
    total = sum(Fraction(c["weight"]) for c in d["sub_tasks"])
    return sum(Fraction(c["weight"]) * _exact(c, s) for c in d["sub_tasks"]) / total if total else Fraction(0)


@settings(max_examples=60, deadline=None)
@given(_trees, st.data())
def test_score_equals_exact_rational_weighted_mean(shape: tuple, data: st.DataObject) -> None:
    raw, ids = _build(shape, [0])
    chosen = data.draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    scores = {i: Fraction(data.draw(st.integers(0, 4)), 4) for i in chosen}
    tree: TaskNode = rubric_from_dict(raw)
    assert score(tree, {k: float(v) for k, v in scores.items()}) == pytest.approx(float(_exact(raw, scores)), abs=1e-12)

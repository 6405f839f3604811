"""Stage 3, rubric: an LLM writes a PaperBench rubric tree for a paper, in three steps, validated at each.

    step 1  paper                  -> contributions   {"contributions": [{"requirements", "weight"}]}
    step 2  paper + contribution   -> requirements    {"requirements": [{"requirements", "weight"}]}  (each, at once)
    step 3  paper + requirement    -> gradable leaves {"leaves": [{"requirements", "weight", "task_category",
                                                        "finegrained_task_category"}]}                 (each, at once)

Each answer is checked (counts within ``rubric.*`` bounds, non-empty text, positive weights, categories from
PaperBench's lists); an invalid answer goes back to the model with the error (llm.py) up to ``rubric.attempts``
replies. The assembled tree (ids: UUID-5 of the paper id and the node's path, so a rerun names nodes alike) is
validated by the project's loader (judge/rubric.py ``rubric_from_dict``), written as ``rubric.json`` and read
back with ``load_rubric``. Limits: the paper is cut to ``rubric.paper_chars`` characters in every prompt.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from klong_megatron.config.factory import RubricGenConfig
from klong_megatron.factory.llm import FactoryLLM, need
from klong_megatron.judge.rubric import CATEGORIES, TaskNode, rubric_from_dict

FINEGRAINED = (
    "Method Implementation",
    "Experimental Setup",
    "Dataset and Model Acquisition",
    "Data Processing & Preparation",
    "Evaluation, Metrics & Benchmarking",
    "Logging, Analysis & Presentation",
)
"""PaperBench's finegrained task categories (as used in its released rubrics)."""

INTRO = """You write a grading rubric for a benchmark in which an AI agent reproduces a research paper from \
scratch (PaperBench). The rubric is a tree: the root says the paper has been reproduced; its children are the \
paper's core contributions; each contribution has requirements; each requirement has gradable leaves. Every \
node's "requirements" is one sentence stating what must be true of the submission; "weight" is a positive \
integer giving its importance among its siblings. Answer with one JSON object only.
"""
STEP1 = (
    INTRO
    + """Step 1 of 3: list the paper's {lo} to {hi} core contributions that a reproduction must \
achieve. Format: {{"contributions": [{{"requirements": "...", "weight": 1}}]}}"""
)
STEP2 = (
    INTRO
    + """Step 2 of 3: for the contribution below, list {lo} to {hi} requirements (implementation, \
experiments, results). Format: {{"requirements": [{{"requirements": "...", "weight": 1}}]}}"""
)
STEP3 = (
    INTRO
    + """Step 3 of 3: for the requirement below, list {lo} to {hi} leaves, each checkable on its own \
by a judge reading the submission. "task_category" is one of {cats}: "Code Development" (the code implements \
it), "Code Execution" (running the code produced it), "Result Analysis" (the results match the paper). \
"finegrained_task_category" is one of {fine}. Format: {{"leaves": [{{"requirements": "...", "weight": 1, \
"task_category": "...", "finegrained_task_category": "..."}}]}}"""
)


def _items(key: str, lo: int, hi: int, leaf: bool = False):  # noqa: ANN202 - returns a checker
    def check(data: Any) -> list[dict[str, Any]]:
        items = need(data, key, list, "answer")
        if not lo <= len(items) <= hi:
            raise ValueError(f"answer.{key} must have {lo} to {hi} items, got {len(items)}")
        out = []
        for i, it in enumerate(items):
            where = f"answer.{key}[{i}]"
            text = need(it, "requirements", str, where).strip()
            weight = need(it, "weight", (int, float), where)
            if not text or weight <= 0:
                raise ValueError(f"{where}: 'requirements' must be non-empty and 'weight' > 0")
            node = {"requirements": text, "weight": weight}
            if leaf:
                node["task_category"] = need(it, "task_category", str, where)
                node["finegrained_task_category"] = need(it, "finegrained_task_category", str, where)
                if node["task_category"] not in CATEGORIES:
                    raise ValueError(f"{where}.task_category must be one of {list(CATEGORIES)}, "
                                     f"got {node['task_category']!r}")  # fmt: skip
                if node["finegrained_task_category"] not in FINEGRAINED:
                    raise ValueError(f"{where}.finegrained_task_category must be one of {list(FINEGRAINED)}, "
                                     f"got {node['finegrained_task_category']!r}")  # fmt: skip
            out.append(node)
        return out

    return check


async def _all(coros: list[Any]) -> list[Any]:
    """``asyncio.gather`` that cancels the other requests once one fails (their answers would be thrown away)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def _node_id(paper_id: str, path: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"klong-factory/{paper_id}/{path}"))


async def write_rubric(paper_md: str, title: str, paper_id: str, cfg: RubricGenConfig, llm: FactoryLLM) -> TaskNode:
    """The validated rubric tree of one paper (raises SchemaError / ChatEngineError / RubricError)."""
    paper = f"Paper: {title}\n\n{paper_md[: cfg.paper_chars]}"
    (c_lo, c_hi), (r_lo, r_hi), (l_lo, l_hi) = cfg.contributions, cfg.requirements, cfg.leaves
    contribs = await llm.ask_json(STEP1.format(lo=c_lo, hi=c_hi), paper,
                                  _items("contributions", c_lo, c_hi), cfg.attempts)  # fmt: skip

    async def requirements(c: dict[str, Any]) -> list[dict[str, Any]]:
        user = f"{paper}\n\nContribution: {c['requirements']}"
        return await llm.ask_json(STEP2.format(lo=r_lo, hi=r_hi), user, _items("requirements", r_lo, r_hi),
                                  cfg.attempts)  # fmt: skip

    async def leaves(c: dict[str, Any], r: dict[str, Any]) -> list[dict[str, Any]]:
        user = f"{paper}\n\nContribution: {c['requirements']}\nRequirement: {r['requirements']}"
        step3 = STEP3.format(lo=l_lo, hi=l_hi, cats=list(CATEGORIES), fine=list(FINEGRAINED))
        return await llm.ask_json(step3, user, _items("leaves", l_lo, l_hi, leaf=True), cfg.attempts)

    reqs = await _all([requirements(c) for c in contribs])
    pairs = [(c, r) for c, rs in zip(contribs, reqs, strict=True) for r in rs]
    leaf_lists = iter(await _all([leaves(c, r) for c, r in pairs]))
    tree: dict[str, Any] = {
        "id": _node_id(paper_id, "root"),
        "requirements": f'The core contributions of the paper "{title}" have been reproduced.',
        "weight": 1,
        "sub_tasks": [],
    }
    for i, (c, rs) in enumerate(zip(contribs, reqs, strict=True)):
        cnode = {**c, "id": _node_id(paper_id, f"{i}"), "sub_tasks": []}
        for j, r in enumerate(rs):
            leaves_ = [{**leaf, "id": _node_id(paper_id, f"{i}.{j}.{k}"), "sub_tasks": []}
                       for k, leaf in enumerate(next(leaf_lists))]  # fmt: skip
            cnode["sub_tasks"].append({**r, "id": _node_id(paper_id, f"{i}.{j}"), "sub_tasks": leaves_})
        tree["sub_tasks"].append(cnode)
    return rubric_from_dict(tree, f"generated rubric of {paper_id}")

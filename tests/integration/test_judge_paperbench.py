"""The judge on a real PaperBench task folder, checked against what PaperBench's judge shows each leaf.

Real parts: the mechanistic-understanding folder (rubric.json, paper.md, addendum.md) from ../shared, the real
Qwen3 tokenizer for the budgets, HTTP to a scripted OpenAI-compatible judge double that records every request.
Reference: openai/preparedness project/paperbench/paperbench/judge/simple.py (file sets per category, the
Result Analysis mtime rule, ranking with paper + addendum + criterion + tree, at most 10 files, budgets from
the context window), rubric/tasks.py (get_prior_nodes), judge/utils.py (reduce_log).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from pathlib import Path

import pytest
from openai_judge_double import OpenAIJudgeDouble, Reply, criterion_of, is_parse, is_ranking, keyword_responder

from klong_megatron.config.judge import JudgeConfig
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge, JudgeResult
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.rubric import load_rubric
from klong_megatron.judge.submission import TokenCounter

SHARED = Path(__file__).resolve().parents[3] / "shared"
TASK = SHARED / "data" / "paperbench_tasks" / "mechanistic-understanding"
QWEN3 = SHARED / "real_tokenizers" / "qwen3"
WINDOW = 40_000
T0 = 1_800_000_000.0
JUDGE_NOTE = "JUDGE-ONLY NOTE: accept any toxicity classifier with a public checkpoint."


def _submission(root: Path, *, run_wrote_results: bool = True) -> Path:
    files = {
        "README.md": "# DPO toxicity reproduction\n\nRun `bash reproduce.sh`.\n",
        "reproduce.sh": "python src/train_probe.py && python src/dpo.py > results/table1.csv\n",
        "configs/dpo.yaml": "beta: 0.1\nlr: 1e-6\n",
        "results/table1.csv": "model,toxicity,perplexity\ngpt2,0.453,21.7\ngpt2-dpo,0.208,23.3\n",
        "results/old_notes.csv": "written before the run\n",
        "venv/lib/site.py": "print('a virtual environment is never evidence')\n",
        "wandb/run-1/output.txt": "wandb logs are never evidence\n",
    }
    for i in range(14):
        body = "".join(f"def step_{i}_{j}(model, batch):\n    return model(batch).loss * {j}\n\n" for j in range(60))
        files[f"src/module_{i:02d}.py"] = f'"""DPO component {i}."""\n' + body
    log = "".join(f"epoch 1 step {k} loss {1 / (k + 1):.4f} lr 1e-06\n" for k in range(3000))
    files["reproduce.log"] = "loading gpt2-medium\n" + log + "final toxicity 0.208\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        os.utime(root / rel, (T0 - 600, T0 - 600))
    if run_wrote_results:
        os.utime(root / "results" / "table1.csv", (T0 + 60, T0 + 60))
    meta = {"exit_code": 0, "duration_s": 120.0, "timed_out": False, "missing_script": False, "log_created_at": T0}
    (root / "reproduce.meta.json").write_text(json.dumps(meta))
    return root


def _grade(url: str, sub: Path, **kw: object) -> JudgeResult:
    async def go() -> JudgeResult:
        pool = ChatPool([url], "judge-double", max_concurrency=16)
        grader = LLMGrader(pool, counter=TokenCounter(QWEN3), context_window=WINDOW, **kw)
        task = dict(paper=(TASK / "paper.md").read_text(), addendum=(TASK / "addendum.md").read_text())
        async with Judge(llm=grader, cache=GradeCache()) as judge:
            res = await judge.grade(sub, load_rubric(TASK / "rubric.json"), judge_addendum=JUDGE_NOTE, **task)
        await pool.aclose()
        return res

    return asyncio.run(go())


def _text(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"])


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> tuple[JudgeResult, list[dict]]:
    sub = _submission(tmp_path_factory.mktemp("pb") / "submission")
    with OpenAIJudgeDouble(keyword_responder) as srv:
        res = _grade(srv.url, sub)
    return res, srv.requests


def test_every_leaf_is_graded_validly_with_ranking_and_one_grading_call(graded) -> None:
    res, requests = graded
    rubric = load_rubric(TASK / "rubric.json")
    assert len(res.leaves) == 96 and not res.invalid and res.invalid_frac == 0.0
    assert sum(map(is_ranking, requests)) == 96 and len(requests) == 2 * 96
    assert res.token_usage["calls"] == 2 * 96
    assert all(len(g.meta["files"]) <= 10 for g in res.leaves.values())
    ra = {leaf.id for leaf in rubric.leaves() if leaf.task_category == "Result Analysis"}
    assert all(res.leaves[i].meta["files"] == ["README.md", "results/table1.csv"] for i in ra)


def test_prompts_stay_inside_the_context_window_counted_with_the_real_tokenizer(graded) -> None:
    _, requests = graded
    counter = TokenCounter(QWEN3)
    grading = [r for r in requests if not is_ranking(r)]
    by_cat = {c: [r for r in grading if f"of type {c} -" in _text(r)] for c in ("Code Development", "Code Execution")}
    sample = by_cat["Code Development"][:3] + by_cat["Code Execution"][:3]
    for body in sample:
        n = counter.count(_text(body))
        assert WINDOW - 10_000 - 2_000 - 3_000 < n <= WINDOW  # files fill the budget, the prompt fits
    files = [re.findall(r"<FILE:(.*?)>", _text(r)) for r in sample]
    assert all(fs and all(p.startswith("src/") for p in fs) for fs in files)  # the double ranks *.py files


def test_each_category_sees_paperbench_evidence(graded) -> None:
    _, requests = graded
    paper_head = (TASK / "paper.md").read_text()[:300]
    addendum_head = (TASK / "addendum.md").read_text()[:200]
    for body in requests:
        text = _text(body)
        assert paper_head in text and addendum_head in text and JUDGE_NOTE in text  # ranking prompts too
        assert "venv/" not in text and "wandb/" not in text and "reproduce.meta.json" not in text
    for body in [r for r in requests if not is_ranking(r)]:
        text = _text(body)
        category = re.search(r"of type (.*?) - ", text).group(1)
        assert "<reproduce.sh>\npython src/train_probe.py" in text  # every category, as PaperBench
        assert ("<reproduce.log>" in text) == (category != "Code Development")
        if category != "Code Development":  # the log, repeated lines collapsed (reduce_log)
            assert "(repeated 3000 times)" in text and "final toxicity 0.208" in text
            assert text.count("epoch 1 step") == 1
        if category == "Result Analysis":
            shown = re.findall(r"<FILE:(.*?)>", text)
            assert shown == ["README.md", "results/table1.csv"]  # docs + tables written by the run


def test_ranking_requests_carry_the_category_tree(graded) -> None:
    _, requests = graded
    for body in [r for r in requests if is_ranking(r)]:
        tree = body["messages"][-1]["content"].split("Directory structure:\n")[1]
        criterion = criterion_of(body)
        assert criterion and "Now return a list of the 10 most relevant files" in body["messages"][-1]["content"]
        if "table1.csv" in tree and "module_00.py" not in tree:  # Result Analysis: docs + touched tables
            assert "old_notes.csv" not in tree
        else:
            assert "module_13.py" in tree and "dpo.yaml" in tree and "table1.csv" not in tree


def test_preceding_criteria_are_ancestors_and_preceding_siblings(graded) -> None:
    _, requests = graded
    rubric = load_rubric(TASK / "rubric.json")
    expected: dict[str, set[str]] = {}
    for leaf in rubric.leaves():
        block = "".join(f" -> {n.requirements}\n" for n in rubric.prior_nodes(leaf.id))
        expected.setdefault(leaf.requirements, set()).add(block)
    sizes = []
    for body in [r for r in requests if not is_ranking(r)]:
        block = re.search(r"<preceding_criteria>\n(.*?)</preceding_criteria>", _text(body), re.DOTALL).group(1)
        assert block in expected[criterion_of(body)]
        sizes.append(block.count(" -> "))
    ancestors = max(len(path) for path, node in rubric.walk() if node.is_leaf)
    assert max(sizes) >= 9 > ancestors  # PaperBench's context is wider than the path from the root


def test_result_analysis_scores_zero_when_the_run_wrote_no_results(tmp_path: Path) -> None:
    sub = _submission(tmp_path / "submission", run_wrote_results=False)
    rubric = load_rubric(TASK / "rubric.json")
    ra = [leaf for leaf in rubric.leaves() if leaf.task_category == "Result Analysis"]
    with OpenAIJudgeDouble(keyword_responder) as srv:
        res = _grade(srv.url, sub, parse_mode="structured")
    assert len(ra) == 16 and all(res.leaves[x.id].score == 0.0 and res.leaves[x.id].valid for x in ra)
    assert not any("of type Result Analysis" in _text(r) for r in srv.requests)
    assert len(srv.requests) == 3 * (96 - 16)  # ranking, grading, structured parse per other leaf
    assert all(is_parse(r) for r in srv.requests if r["messages"][0]["content"].startswith("You are given the output"))


def test_a_context_window_needs_the_judge_models_tokenizer() -> None:
    with pytest.raises(ValueError, match="tokenizer must be set when context_window is set"):
        JudgeConfig(context_window=131072, tokenizer=None)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        LLMGrader(ChatPool(["http://127.0.0.1:9"], "m"), context_window=131072)
    with pytest.raises(FileNotFoundError, match="not a Hub id in the local Hugging Face cache"):
        TokenCounter("some-org/not-downloaded-model")


def test_retries_wait_out_an_outage_and_the_cache_follows_the_judge_setup(tmp_path: Path) -> None:
    """Real folder, rubric cut to the root's children (max_depth=2): a judge outage is waited out, a regrade
    with the same setup costs no call, a changed judge addendum or reasoning effort grades again."""
    from klong_megatron.judge.factory import prepare_rubric

    sub = _submission(tmp_path / "submission")
    rubric = prepare_rubric(load_rubric(TASK / "rubric.json"), JudgeConfig(max_depth=2, use_checks=False))
    n = len(list(rubric.leaves()))
    down, lock = {"left": 25}, threading.Lock()

    def flaky(body: dict) -> Reply | str:
        with lock:  # the double answers from several threads
            failing = down["left"] > 0
            down["left"] -= 1
        return Reply("restarting", status=503) if failing else keyword_responder(body)

    async def go(url: str, cache: GradeCache, note: str, effort: str) -> JudgeResult:
        pool = ChatPool([url], "judge-double", cooldown_s=0.01)
        grader = LLMGrader(pool, counter=TokenCounter(QWEN3), context_window=WINDOW, backoff_s=0.01,
                           backoff_max_s=0.05, request_params={"reasoning_effort": effort})  # fmt: skip
        async with Judge(llm=grader, cache=cache) as judge:
            res = await judge.grade(sub, rubric, paper=(TASK / "paper.md").read_text(), judge_addendum=note)
        await pool.aclose()
        return res

    cache = GradeCache(tmp_path / "cache.sqlite")
    with OpenAIJudgeDouble(flaky) as srv:
        first = asyncio.run(go(srv.url, cache, "note", "high"))
        assert not first.invalid and srv.served == 25 + 2 * n  # every 503 retried, then ranking + grading
        assert asyncio.run(go(srv.url, cache, "note", "high")).token_usage["calls"] == 0
        assert srv.served == 25 + 2 * n
        for note, effort in (("another note", "high"), ("note", "low")):
            assert asyncio.run(go(srv.url, cache, note, effort)).token_usage["calls"] == 2 * n
    assert all(r.get("reasoning_effort") in ("high", "low") for r in srv.requests)

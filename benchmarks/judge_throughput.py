"""Judge cost and orchestration speed, measured against a zero-latency OpenAI-compatible endpoint.

    .venv/bin/python benchmarks/judge_throughput.py [--leaves 1000] [--train-jobs 1000] [--only cost|speed]

0. Cost of grading a real PaperBench paper (mechanistic-understanding: rubric, paper.md, addendum.md; a
   synthetic 46-file submission of ~270 kB with a 3000-line reproduce.log): model calls and prompt tokens
   per leaf (counted with the real Qwen3 tokenizer over every recorded request) and leaves/s, for the
   PaperBench-style settings (window 131072, strict or structured parse) and the fixed budgets.
1. Leaves/s grading a 1000-leaf rubric (requirements taken from the real PaperBench rubrics) through
   the full path (prompt building, HTTP, parsing, cache, aggregation). Baseline: one request at a time.
2. Latency of eval jobs submitted while 1000 train jobs wait in the persistent queue, against a
   baseline where the same jobs get no priority (FIFO behind the train jobs).
The endpoint is the OpenAI-compatible test double from tests/ (no model, replies at once), run in a
separate process so that it does not share the judge's interpreter. "leaves per judge CPU-s" is the
judge process's own cost (what one judge process could drive if endpoints were infinitely fast); wall
leaves/s here is bounded by the stdlib test-double server on a small machine, not by the judge. With a
real judge model the endpoint's latency dominates and the concurrency slots are what matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from klong_megatron.judge.base import GradingTask
from klong_megatron.judge.cache import GradeCache
from klong_megatron.judge.endpoints import ChatPool
from klong_megatron.judge.judge import Judge
from klong_megatron.judge.llm import LLMGrader
from klong_megatron.judge.rubric import TaskNode, load_rubric, rubric_from_dict
from klong_megatron.judge.submission import Submission, TokenCounter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RUBRICS = SHARED / "data" / "paperbench_rubrics"
TASK = SHARED / "data" / "paperbench_tasks" / "mechanistic-understanding"
QWEN3 = SHARED / "real_tokenizers" / "qwen3"
sys.path.insert(0, str(ROOT / "tests" / "integration"))
SERVER = f"""
import sys, time
sys.path.insert(0, {str(ROOT / "tests" / "integration")!r})
from openai_judge_double import OpenAIJudgeDouble, grade_reply, is_ranking, tree_paths
srv = OpenAIJudgeDouble(lambda body: "\\n".join(tree_paths(body)[:10]) if is_ranking(body) else grade_reply(1),
                        record=False).start()
print(srv.url, flush=True)
while True:
    time.sleep(1)
"""
console = Console(width=110)


def big_rubric(n_leaves: int) -> TaskNode:
    """10 groups x 10 subgroups x ceil(n/100) leaves (trimmed to ``n_leaves``), texts from the real rubrics."""
    texts = [
        (leaf.requirements, leaf.task_category)
        for p in sorted(RUBRICS.glob("*.json"))
        for leaf in load_rubric(p).leaves()
    ]
    per = -(-n_leaves // 100)
    groups, k = [], 0
    for g in range(10):
        subs = []
        for s in range(10):
            leaves = []
            for _ in range(per):
                if k < n_leaves:
                    req, cat = texts[k % len(texts)]
                    leaves.append(
                        {"id": f"l{k}", "requirements": req, "weight": 1 + k % 3, "sub_tasks": [], "task_category": cat}
                    )
                    k += 1
            if leaves:
                subs.append({"id": f"g{g}s{s}", "requirements": f"part {g}.{s}", "weight": 1, "sub_tasks": leaves})
        groups.append({"id": f"g{g}", "requirements": f"part {g}", "weight": 1 + g % 2, "sub_tasks": subs})
    return rubric_from_dict(
        {"id": "root", "requirements": "The paper is reproduced.", "weight": 1, "sub_tasks": groups}
    )


def submission(tmp: Path) -> Submission:
    root = tmp / "submission"
    root.mkdir()
    for i in range(20):
        (root / f"module_{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (root / "reproduce.sh").write_text("python module_0.py\n")
    (root / "reproduce.log").write_text("step 1 loss 0.5\n" * 100)
    (root / "results.csv").write_text("loss\n0.5\n")
    later = (root / "reproduce.log").stat().st_mtime + 60
    os.utime(root / "results.csv", (later, later))  # written by the run: Result Analysis leaves are graded
    return Submission(root)


async def grade_leaves(
    urls: list[str], task: GradingTask, concurrency: int, cache: GradeCache | None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this judge process) to grade every leaf of ``task``."""
    pool = ChatPool(urls, "judge-double", max_concurrency=concurrency)
    judge = Judge(llm=LLMGrader(pool), cache=cache or GradeCache())
    t0, c0 = time.perf_counter(), time.process_time()
    result = await judge.run(task)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    await pool.aclose()
    assert result.complete and abs(result.score - 1.0) < 1e-9, result.invalid[:3]
    assert sum(e.failures for e in pool.endpoints) == 0
    return dt, cpu


def paper_submission(root: Path) -> Path:
    """48 files (~270 kB): 40 modules, README, results table, reproduce.sh and a 3000-line training log."""
    (root / "src").mkdir(parents=True)
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x, y):\n    '''step {j}'''\n    return x * {j} + y - {i}\n\n" for j in range(80))
        (root / f"src/mod_{i}.py").write_text(body)
    (root / "README.md").write_text("# Reproduction\n" + "We train a probe and run DPO.\n" * 40)
    (root / "reproduce.sh").write_text("python src/mod_0.py\n")
    (root / "results").mkdir()
    (root / "results/table1.csv").write_text("model,toxicity\n" + "".join(f"m{i},0.{i}\n" for i in range(50)))
    log = "".join(f"epoch 1 step {i} loss {1 / (i + 1):.4f} 12.3it/s\n" for i in range(3000))
    (root / "reproduce.log").write_text(log + "final toxicity 0.21\n")
    later = (root / "reproduce.log").stat().st_mtime + 60
    os.utime(root / "results/table1.csv", (later, later))  # written by the run: Result Analysis is graded
    return root


def paper_cost(sub: Path, tokens: TokenCounter, **grader_kw: object) -> tuple[float, float, int, float, float]:
    """(calls / leaf, prompt tokens / leaf, largest prompt, leaves/s, leaves per CPU-s) for the real paper task.

    CPU-s: this process's CPU time (judge + the in-process double), which a loaded machine disturbs less than
    wall time. Prompt tokens: every message of every recorded request, each distinct text counted once.
    """
    from openai_judge_double import OpenAIJudgeDouble, keyword_responder

    tree = load_rubric(TASK / "rubric.json")
    task = GradingTask(Submission(sub), tree, (TASK / "paper.md").read_text(), (TASK / "addendum.md").read_text())
    with OpenAIJudgeDouble(keyword_responder) as srv:

        async def go() -> tuple[float, float]:
            pool = ChatPool([srv.url], "judge-double", max_concurrency=16)
            judge = Judge(llm=LLMGrader(pool, **grader_kw), cache=GradeCache())
            t0, c0 = time.perf_counter(), time.process_time()
            res = await judge.run(task)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            await pool.aclose()
            assert not res.invalid, res.invalid[:3]
            return dt, cpu

        dt, cpu = asyncio.run(go())
        memo: dict[str, int] = {}
        sizes = [sum(memo.setdefault(m["content"], tokens.count(m["content"])) if m["content"] not in memo
                     else memo[m["content"]] for m in r["messages"]) for r in srv.requests]  # fmt: skip
    n = len(list(tree.leaves()))
    return len(sizes) / n, sum(sizes) / n, max(sizes), n / dt, n / cpu


def cost_table() -> None:
    counter = TokenCounter(QWEN3)
    window = {"counter": counter, "context_window": 131072}
    with tempfile.TemporaryDirectory() as d:
        sub = paper_submission(Path(d) / "submission")
        rows = [
            ("window 131072, strict parse (default)", paper_cost(sub, counter, **window)),
            ("window 131072, structured parse call", paper_cost(sub, counter, **window, parse_mode="structured")),
            ("fixed budgets 50k/60k/8k, chars/4", paper_cost(sub, counter)),
        ]
    t = Table(title="grading cost per leaf: mechanistic-understanding (96 leaves), zero-latency judge double")
    for col in ("setting", "calls / leaf", "prompt tokens / leaf", "largest prompt", "leaves/s", "leaves / CPU-s"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for name, (calls, toks, big, rate, cpu_rate) in rows:
        t.add_row(name, f"{calls:.2f}", f"{toks:,.0f}", f"{big:,}", f"{rate:.1f}", f"{cpu_rate:.1f}")
    console.print(t)
    print(json.dumps({"cost": dict(rows)}))


async def queue_latency(url: str, subs: list[Path], state: Path, priority: bool) -> tuple[float, float, float]:
    """(eval p50, eval max, total) seconds; every job grades its own submission (no cache hits)."""
    leaf = {"requirements": "an item", "weight": 1, "sub_tasks": [], "task_category": "Code Development"}
    items = [{**leaf, "id": f"x{i}"} for i in range(3)]
    tree = rubric_from_dict({"id": "r", "requirements": "", "weight": 1, "sub_tasks": items})
    pool = ChatPool([url], "judge-double", max_concurrency=8)
    eval_latency: list[float] = []
    async with Judge(llm=LLMGrader(pool), cache=GradeCache(), state_dir=state, max_concurrent_jobs=8) as judge:
        t0 = time.perf_counter()
        train = [judge.queue.submit(Judge.job(sub, tree, out_path=state / "t.json")) for sub in subs[10:]]

        async def one_eval(sub: Path) -> None:
            start = time.perf_counter()
            job = Judge.job(sub, tree, priority="eval" if priority else "train", out_path=state / "e.json")
            await judge.queue.wait(judge.queue.submit(job))
            eval_latency.append(time.perf_counter() - start)

        evals = []
        for sub in subs[:10]:
            evals.append(asyncio.create_task(one_eval(sub)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*evals)
        for job_id in train:
            await judge.queue.wait(job_id)
        total = time.perf_counter() - t0
    await pool.aclose()
    return statistics.median(eval_latency), max(eval_latency), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--leaves", type=int, default=1000)
    ap.add_argument("--train-jobs", type=int, default=1000)
    ap.add_argument("--only", choices=["cost", "speed"], default=None, help="run one part only")
    args = ap.parse_args()
    if args.only != "speed":
        cost_table()
    if args.only == "cost":
        return
    servers = [subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    urls = [s.stdout.readline().strip() for s in servers]  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            sub = submission(tmp)
            task = GradingTask(sub, big_rubric(args.leaves), paper="# Paper\n" + "text " * 2000)
            n = len(list(task.rubric.leaves()))
            rows = []
            with Progress(console=console, transient=True) as progress:
                bar = progress.add_task("grading", total=5)
                for name, us, conc in [
                    ("sequential (baseline)", urls[:1], 1),
                    ("1 endpoint x 4 slots", urls[:1], 4),
                    ("2 endpoints x 4 slots", urls, 4),
                    ("2 endpoints x 32 slots", urls, 32),
                ]:
                    wall, cpu = asyncio.run(grade_leaves(us, task, conc, None))
                    rows.append((name, n / wall, n / cpu))
                    progress.advance(bar)
                cache = GradeCache(tmp / "cache.sqlite")
                asyncio.run(grade_leaves(urls, task, 32, cache))
                wall, cpu = asyncio.run(grade_leaves(urls, task, 32, cache))
                rows.append(("all leaves cached (SQLite)", n / wall, n / cpu))
                progress.advance(bar)
            t = Table(title=f"judge throughput: {n}-leaf rubric, zero-latency endpoint")
            for col in ("setting", "leaves/s (wall)", "vs baseline", "leaves per judge CPU-s"):
                t.add_column(col, justify="left" if col == "setting" else "right")
            for name, rate, cpu_rate in rows:
                t.add_row(name, f"{rate:,.0f}", f"{rate / rows[0][1]:.1f}x", f"{cpu_rate:,.0f}")
            console.print(t)

            q = Table(title=f"eval job latency while {args.train_jobs} train jobs wait (8 concurrent jobs)")
            for col in ("queue", "eval p50 s", "eval max s", "all jobs s", "p50 vs FIFO"):
                q.add_column(col, justify="left" if col == "queue" else "right")
            subs = []
            for i in range(args.train_jobs + 10):
                (tmp / "subs" / str(i)).mkdir(parents=True)
                (tmp / "subs" / str(i) / "main.py").write_text(f"print({i})\n")
                subs.append(tmp / "subs" / str(i))
            with console.status("queue latency ..."):
                fifo = asyncio.run(queue_latency(urls[0], subs, tmp / "fifo", priority=False))
                prio = asyncio.run(queue_latency(urls[0], subs, tmp / "prio", priority=True))
            q.add_row("FIFO (baseline)", f"{fifo[0]:.3f}", f"{fifo[1]:.3f}", f"{fifo[2]:.1f}", "1.0x")
            q.add_row(
                "eval priority",
                f"{prio[0]:.3f}",
                f"{prio[1]:.3f}",
                f"{prio[2]:.1f}",
                f"{fifo[0] / prio[0]:.0f}x faster",
            )
            console.print(q)
            print(json.dumps({"throughput": {r[0]: r[1:] for r in rows}, "queue": {"fifo": fifo, "priority": prio}}))
    finally:
        for s in servers:
            s.kill()
            s.wait()


if __name__ == "__main__":
    main()

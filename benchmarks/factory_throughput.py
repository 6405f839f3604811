"""Research-Factory throughput: paper conversion on one core, and the LLM stages' own overhead.

    .venv/bin/python benchmarks/factory_throughput.py [--pdfs 8] [--pages 10] [--papers 64] [--attempts 64]
        [--only convert|rubric|distil]

1. Conversion (collect's converters, one process, one thread): PDFs made with reportlab (``--pages`` pages of
   text, headings and a ruled table each) through pymupdf4llm, without and with PyMuPDF's layout model, and
   arXiv-style LaTeX archives through pandoc. Papers per hour on one core = 3600 / mean CPU seconds per paper
   (this process + pandoc; wall time is shown too and depends on the machine's load; the first conversion,
   which pays the imports, is left out).
2. Rubric generation (stage rubric, 3 contributions x 2 requirements x 3 leaves = 10 LLM calls per paper) over
   ``--papers`` Markdown papers at concurrency 1, 16 and 64, against the zero-latency scripted endpoint
   (tests/integration/factory_llm_double.py) run in its own process: what the pipeline itself costs (prompt
   building, HTTP, JSON checks, validation, atomic writes). With a real model the endpoint's latency dominates
   and concurrency is what hides it.
3. Distillation (stage distil, factory/distil.py): ``--attempts`` scripted teacher attempts (8 per task) at
   concurrency 1, 16 and 64, each a full sandboxed rollout + reproduction + judging against zero-latency teacher
   and judge doubles (tests/integration/openai_agent_double.py, openai_judge_double.py) in their own process.
   "rollout/grade s/attempt" are per-attempt sums (they overlap under concurrency); grading includes the
   reproduction step's wait for a fresh second (its timestamp check), ~0.5 s on average.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from factory_papers import make_latex_archive, make_markdown, make_pdf  # noqa: E402

from klong_megatron.config.chat import ChatEngineConfig  # noqa: E402
from klong_megatron.config.factory import CollectConfig, FactoryConfig, FilterConfig  # noqa: E402
from klong_megatron.factory.convert import convert  # noqa: E402
from klong_megatron.factory.pipeline import Factory  # noqa: E402

DOUBLE = """import sys, time; sys.path.insert(0, {path!r})
from factory_llm_double import FactoryLLMDouble
d = FactoryLLMDouble(record=False).start(); print(d.url, flush=True); time.sleep(1e9)"""


def _cpu() -> float:
    """CPU seconds of this process and its finished children (pandoc): what one core spends, whatever the load."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def bench_convert(n: int, pages: int) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pdfs = [make_pdf(d / f"p{i}.pdf", f"Paper {i} on widgets", repeats=4 * pages) for i in range(n + 1)]
        texs = [
            make_latex_archive(d / f"t{i}.tar.gz", f"Paper {i} on gadgets", repeats=4 * pages) for i in range(n + 1)
        ]
        for name, files, kw in (("PDF, pymupdf4llm", pdfs, {}), ("PDF, pymupdf4llm + layout model", pdfs,
                                {"pdf_layout": True}), ("LaTeX archive, pandoc", texs, {})):  # fmt: skip
            cpu, wall, chars = [], [], []
            for f in files:
                c0, t0 = _cpu(), time.perf_counter()
                chars.append(len(convert(f, **kw).markdown))
                cpu.append(_cpu() - c0)
                wall.append(time.perf_counter() - t0)
            c, w = statistics.mean(cpu[1:]), statistics.mean(wall[1:])  # the first pays the imports
            rows.append([name, str(n), f"{statistics.mean(chars) / 1000:.0f}k", f"{c:.3f}", f"{w:.3f}",
                         f"{3600 / c:,.0f}"])  # fmt: skip
    return rows


def _papers(d: Path, n: int) -> None:
    d.mkdir()
    for i in range(n):
        make_markdown(d / f"p{i}.md", f"Paper {i} on widgets")


def bench_rubric(n: int, url: str) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _papers(Path(tmp) / "in", n)
        for conc in (1, 16, 64):
            out = Path(tmp) / f"out{conc}"
            cfg = FactoryConfig(stages=["collect", "filter"], concurrency=conc, progress=False,
                                llm=ChatEngineConfig(base_url=url), filter=FilterConfig(min_chars=1000),
                                collect=CollectConfig(inputs=[str(Path(tmp) / "in")]))  # fmt: skip
            Factory(cfg, out).run()
            cfg.stages = ["rubric"]
            factory = Factory(cfg, out)
            cpu0 = time.process_time()
            res = factory.run()["stages"]["rubric"]
            cpu = time.process_time() - cpu0
            calls, secs = factory.llm_usage["calls"], res["seconds"]
            rows.append([str(conc), str(res["done"]), str(calls), f"{secs:.2f}", f"{res['done'] / secs:.1f}",
                         f"{calls / secs:.0f}", f"{calls / cpu:.0f}"])  # fmt: skip
    return rows


DISTIL_DOUBLES = """import sys, time; sys.path.insert(0, {path!r})
from distil_tasks import judge_script
from openai_agent_double import OpenAIAgentDouble
from openai_judge_double import OpenAIJudgeDouble
t, j = OpenAIAgentDouble(record=False).start(), OpenAIJudgeDouble(judge_script, record=False).start()
print(t.url, j.url, flush=True); time.sleep(1e9)"""


def bench_distil(attempts: int, samples: int = 8) -> list[list[str]]:
    """Stage distil at concurrency 1, 16 and 64: ``attempts`` = tasks x ``samples`` scripted 8-turn teacher rollouts,
    each in a fresh bubblewrap sandbox, reproduce.sh in another, 3 judge calls; then selection and the datasheet.
    Teacher and judge doubles answer at once from their own process: what is measured is the pipeline's overhead."""
    from distil_tasks import make_task

    from klong_megatron.config.distil import DistilConfig
    from klong_megatron.config.judge import JudgeConfig
    from klong_megatron.config.reproduce import ReproduceConfig
    from klong_megatron.config.sandbox import SandboxConfig
    from klong_megatron.factory.distil import run_distil

    code = DISTIL_DOUBLES.format(path=str(ROOT / "tests" / "integration"))
    doubles = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        teacher, judge = doubles.stdout.readline().split()
        sandbox = SandboxConfig(backend="bwrap", memory_mb=1024)
        for conc in (1, 16, 64):
            with tempfile.TemporaryDirectory() as tmp:
                tasks = [make_task(Path(tmp) / "tasks", f"t{i}", f"Widget {i}") for i in range(attempts // samples)]
                cfg = DistilConfig(teacher=ChatEngineConfig(base_url=teacher, model="teacher-double"),
                                   judge=JudgeConfig(endpoints=[judge], model="judge-double", use_checks=False,
                                                     rank_files=False, max_concurrency_per_endpoint=max(conc, 32)),
                                   sandbox=sandbox, reproduce=ReproduceConfig(timeout_s=60, sandbox=sandbox),
                                   samples=samples, concurrency=conc, time_limit_s=600, max_turns=20)  # fmt: skip
                cpu0, t0 = time.process_time(), time.perf_counter()
                sheet = run_distil(cfg, tasks, Path(tmp) / "distil")
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            a, run = sheet["attempts"], sheet["last_run"]
            assert a["graded"] == len(tasks) * samples and a["failed"] == 0, a
            n = a["graded"]
            rows.append([str(conc), str(n), str(a["kept"]), f"{wall:.1f}", f"{n / wall * 3600:,.0f}",
                         f"{1000 * wall / n:.0f}", f"{run['rollout_s'] / n:.2f}", f"{run['grade_s'] / n:.2f}",
                         f"{cpu:.1f}"])  # fmt: skip
    finally:
        doubles.kill()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pdfs", type=int, default=8)
    ap.add_argument("--pages", type=int, default=10)
    ap.add_argument("--papers", type=int, default=64)
    ap.add_argument("--attempts", type=int, default=64, help="distil: teacher attempts per concurrency level")
    ap.add_argument("--only", choices=["convert", "rubric", "distil"])
    args = ap.parse_args()
    console = Console()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.only in (None, "convert"):
        t = Table(title=f"Conversion on one core ({args.pages}-page PDFs)")
        for c in ("source", "papers", "chars/paper", "CPU s/paper", "wall s/paper", "papers/hour (one core)"):
            t.add_column(c)
        for row in bench_convert(args.pdfs, args.pages):
            t.add_row(*row)
        console.print(t)
    if args.only in (None, "rubric"):
        code = DOUBLE.format(path=str(ROOT / "tests" / "integration"))
        double = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            url = double.stdout.readline().strip()
            t = Table(title=f"Rubric generation, {args.papers} papers, zero-latency endpoint (10 calls/paper)")
            for c in (
                "concurrency",
                "papers",
                "LLM calls",
                "wall s",
                "papers/s",
                "calls/s",
                "calls per pipeline CPU-s",
            ):
                t.add_column(c)
            for row in bench_rubric(args.papers, url):
                t.add_row(*row)
            console.print(t)
        finally:
            double.kill()
    if args.only in (None, "distil"):
        t = Table(title=f"Distillation, {args.attempts} attempts, zero-latency teacher + judge, bwrap sandboxes")
        for c in ("concurrency", "attempts", "kept", "wall s", "attempts/hour", "ms/attempt", "rollout s/attempt",
                  "grade s/attempt", "runner CPU s"):  # fmt: skip
            t.add_column(c)
        for row in bench_distil(args.attempts):
            t.add_row(*row)
        console.print(t)


if __name__ == "__main__":
    main()

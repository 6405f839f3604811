"""The factory run: selected stages in order over every paper, concurrent, resumable, failures recorded.

    Factory(cfg, output_dir).run() -> report dict (also report.json / report.md in output_dir)

Each stage lists the papers ready for it (store.py: earlier stages done, the filter kept them), skips those whose
marker says the stage is done, and runs the rest ``concurrency`` at a time: collect and tasks (CPU, files) in a
thread pool, the LLM stages as asyncio tasks sharing one endpoint client that keeps at most ``concurrency``
requests in flight. Any exception of one paper's stage is recorded in ``<stage>.failed.json`` with its type and
message and the run goes on (the next run retries it); a stage's counters go to the console and, with
``logger.backend=wandb``, to W&B. Stage 6 (distil) is factory/distil.py's ``run_distil`` over the task folders.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from klong_megatron.config.factory import FactoryConfig
from klong_megatron.errors import UserError
from klong_megatron.factory.blacklist import blacklist_paper
from klong_megatron.factory.collect import Source, collect_one, local_sources, mark_duplicates, unique_ids
from klong_megatron.factory.filter import filter_paper
from klong_megatron.factory.llm import FactoryLLM
from klong_megatron.factory.rubric import write_rubric
from klong_megatron.factory.stats import compare_table, load_dir, rubric_stats
from klong_megatron.factory.store import PAPER_STAGES, STAGES, PaperDir, Store, write_json, write_text
from klong_megatron.factory.tasks import write_task
from klong_megatron.judge.rubric import load_rubric, rubric_to_dict
from klong_megatron.logging import MetricsLogger


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:1000]


class Factory:
    """One run over ``output_dir`` (created); ``run()`` executes ``cfg.stages``."""

    def __init__(self, cfg: FactoryConfig, output_dir: str | Path, logger: MetricsLogger | None = None) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.store = Store(self.out)
        # the CLI prints the stage counters itself: the logger is on for W&B only
        self.logger = logger or MetricsLogger(cfg.logger, enabled=cfg.logger.backend == "wandb", run_dir=self.out,
                                              config=asdict(cfg), default_name=cfg.name)  # fmt: skip
        self.llm_usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "repairs": 0}

    # ------------------------------------------------------------ driver

    def run(self) -> dict[str, Any]:
        """Run the selected stages; returns (and writes) the report."""
        results: dict[str, Any] = {}
        for step, stage in enumerate(s for s in STAGES if s in self.cfg.stages):
            t0 = time.perf_counter()
            results[stage] = getattr(self, f"_{stage}")()
            results[stage]["seconds"] = round(time.perf_counter() - t0, 3)
            self.logger.log(step, {k: v for k, v in results[stage].items() if isinstance(v, int | float)},
                            prefix=f"factory/{stage}")  # fmt: skip
        report = self.report(results)
        self.logger.finish(1 if report["failures"] else 0)
        return report

    def _each(self, stage: str, papers: list[PaperDir], work: Callable[..., Awaitable[dict[str, Any]]],
              use_llm: bool = False) -> dict[str, int]:  # fmt: skip
        """Run ``work(paper, llm)`` for every paper not yet done with ``stage`` (``llm``: a FactoryLLM made in
        this stage's event loop when ``use_llm``, else None); ``work`` writes the outputs, the marker is set here."""
        todo = [p for p in papers if p.done(stage) is None]
        bar = tqdm(total=len(todo), desc=stage, disable=not self.cfg.progress, file=sys.stderr)
        counts = {"done": 0, "failed": 0, "skipped": len(papers) - len(todo)}

        async def one(p: PaperDir, slots: asyncio.Semaphore, llm: FactoryLLM | None) -> None:
            async with slots:
                try:
                    p.mark_done(stage, await work(p, llm))
                    counts["done"] += 1
                except Exception as e:  # noqa: BLE001 - one paper's failure is recorded, the run goes on
                    p.mark_failed(stage, _error(e))
                    counts["failed"] += 1
                bar.update(1)

        async def main() -> None:
            llm = FactoryLLM(self.cfg.llm, max_in_flight=self.cfg.concurrency) if use_llm and todo else None
            try:
                slots = asyncio.Semaphore(self.cfg.concurrency)
                await asyncio.gather(*(one(p, slots, llm) for p in todo))
            finally:
                if llm is not None:
                    await llm.close()
                    for k, v in llm.usage.items():
                        self.llm_usage[k] += v

        asyncio.run(main())
        bar.close()
        return counts

    # ------------------------------------------------------------ stages

    def _collect(self) -> dict[str, Any]:
        c = self.cfg.collect
        if not (c.inputs or c.arxiv_ids or c.arxiv_query):
            raise UserError("stage collect: no papers given: set collect.inputs=[DIR] (or collect.arxiv_ids, "
                            "collect.arxiv_query), or leave collect out of stages")  # fmt: skip
        sources: list[Source] = local_sources(c.inputs)
        if c.inputs and not sources:
            raise UserError(f"collect.inputs {list(c.inputs)}: no paper files (.pdf, .tar.gz, .tgz, .gz, .tex, .md)")
        failures: list[tuple[str, str]] = []
        if c.arxiv_ids or c.arxiv_query:
            from klong_megatron.factory.arxiv_source import arxiv_sources

            found, failures = arxiv_sources(c.arxiv_ids, c.arxiv_query, c.arxiv_max_results, self.out / "downloads",
                                            api_url=c.arxiv_api_url)  # fmt: skip
            sources += found
        by_id = {s.paper_id: s for s in unique_ids(sources)}
        for pid, src in list(by_id.items()):  # an id an earlier run gave to another file (files added since)
            done = self.store.paper(pid).done("collect")
            if done and done["source"] != src.origin:
                failures.append((src.origin, f"paper id {pid!r} already holds {done['source']}: rename the file"))
                del by_id[pid]
        pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="collect")

        async def work(p: PaperDir, _: None) -> dict[str, Any]:
            return await asyncio.get_running_loop().run_in_executor(
                pool, lambda: collect_one(by_id[p.paper_id], p, pdf_layout=c.pdf_layout, pandoc=c.pandoc,
                                          min_chars=c.min_chars))  # fmt: skip

        with pool:
            counts = self._each("collect", [self.store.paper(i) for i in by_id], work)
        write_json(self.out / "collect_failures.json", [{"source": s, "error": e} for s, e in failures])
        dups = mark_duplicates([self.store.paper(i) for i in by_id])
        return {**counts, "sources": len(by_id), "duplicates": len(dups), "lookup_failed": len(failures)}

    def _filter(self) -> dict[str, Any]:
        async def work(p: PaperDir, llm: FactoryLLM | None) -> dict[str, Any]:
            decision = await filter_paper(p.path("paper.md").read_text(), p.meta(), self.cfg.filter, llm)
            write_json(p.path("filter.json"), decision)
            return {"keep": decision["keep"]}

        papers = self.store.ready_for("filter")
        counts = self._each("filter", papers, work, self.cfg.filter.llm)
        kept = sum(1 for p in papers if (d := p.done("filter")) and d["keep"])
        return {**counts, "kept": kept, "rejected": sum(1 for p in papers if p.done("filter")) - kept}

    def _rubric(self) -> dict[str, Any]:
        async def work(p: PaperDir, llm: FactoryLLM | None) -> dict[str, Any]:
            assert llm is not None
            meta = p.meta()
            tree = await write_rubric(p.path("paper.md").read_text(), meta["title"], p.paper_id, self.cfg.rubric, llm)
            write_json(p.path("rubric.json"), rubric_to_dict(tree))
            return rubric_stats(load_rubric(p.path("rubric.json")))

        return self._each("rubric", self.store.ready_for("rubric"), work, True)

    def _blacklist(self) -> dict[str, Any]:
        cfg = self.cfg.blacklist

        async def work(p: PaperDir, llm: FactoryLLM | None) -> dict[str, Any]:
            found = await blacklist_paper(p.path("paper.md").read_text(), p.meta()["title"], cfg, llm,
                                          self.cfg.rubric.paper_chars)  # fmt: skip
            write_text(p.path("blacklist.txt"), "\n".join(found["urls"] or ["none"]) + "\n")
            if found["addendum"]:
                write_text(p.path("addendum.md"), found["addendum"] + "\n")
            write_json(p.path("blacklist.json"), found)
            return {"urls": len(found["urls"]), "candidates": len(found["candidates"])}

        return self._each("blacklist", self.store.ready_for("blacklist"), work, cfg.addendum)

    def _tasks(self) -> dict[str, Any]:
        tasks_dir = self.out / "tasks"
        tasks_dir.mkdir(exist_ok=True)

        async def work(p: PaperDir, _: None) -> dict[str, Any]:
            task = await asyncio.to_thread(write_task, p, tasks_dir)
            return {"path": str(task.root), "leaves": len(list(task.rubric.leaves()))}

        return self._each("tasks", self.store.ready_for("tasks"), work)

    def _distil(self) -> dict[str, Any]:
        from klong_megatron.factory.distil import run_distil

        task_dirs = [self.out / "tasks" / p.paper_id for p in self.store.ready_for("distil")]
        if not task_dirs:
            return {"tasks": 0}
        summary = run_distil(self.cfg.distil, task_dirs, self.out / "distil", progress=self.cfg.progress)
        attempts = summary.get("attempts", {})
        flat = {f"attempts_{k}": v for k, v in attempts.items()}
        flat |= {f"decided_{k}": v for k, v in summary.get("decisions", {}).items()}
        tokens = summary.get("cost_tokens", {}).get("total", 0)
        # counted in attempts (distil.py keeps its own per-attempt records and resume state)
        counts = {"done": attempts.get("graded", 0), "failed": attempts.get("failed", 0)}
        return {**counts, "tasks": len(task_dirs), "tokens_total": tokens, **flat}

    # ------------------------------------------------------------ report

    def report(self, results: dict[str, Any]) -> dict[str, Any]:
        """report.json / report.md: this invocation's stage counters, every paper's state, failures, rubric stats."""
        papers, failures = {}, []
        for d in sorted(p for p in self.store.papers_dir.iterdir() if p.is_dir()):
            p = PaperDir(d)
            state = {s: "done" if p.done(s) else "failed" if p.failed(s) else "-" for s in PAPER_STAGES}
            dup = (p.done("collect") or {}).get("duplicate_of")
            papers[p.paper_id] = {**state, **({"duplicate_of": dup} if dup else {})}
            failures += [{"paper": p.paper_id, "stage": s, "error": p.failed(s)} for s in PAPER_STAGES if p.failed(s)]
        lookups = self.out / "collect_failures.json"
        if lookups.is_file():
            failures += [{"paper": f["source"], "stage": "collect", "error": f["error"]}
                         for f in json.loads(lookups.read_text())]  # fmt: skip
        if n := results.get("distil", {}).get("failed"):
            failures.append({"paper": "(attempts)", "stage": "distil",
                             "error": f"{n} teacher attempts failed: see distil/datasheet.md"})  # fmt: skip
        generated = [load_rubric(PaperDir(self.store.papers_dir / i).path("rubric.json"))
                     for i, s in papers.items() if s["rubric"] == "done"]  # fmt: skip
        reference = load_dir(self.cfg.reference_rubrics) if self.cfg.reference_rubrics else None
        table = compare_table(generated, reference) if generated else ""
        report = {"stages": results, "papers": papers, "failures": failures, "llm_usage": self.llm_usage,
                  "rubric_table": table}  # fmt: skip
        write_json(self.out / "report.json", report)
        lines = ["# Research-Factory report", "", "| stage | " + " | ".join(results) + " |",
                 "|---|" + "---|" * len(results)]  # fmt: skip
        for key in ("done", "skipped", "failed", "seconds"):
            lines.append(f"| {key} | " + " | ".join(str(r.get(key, "")) for r in results.values()) + " |")
        if table:
            lines += ["", "## Rubrics", "", table]
        if failures:
            lines += ["", "## Failures", ""] + [f"- {f['paper']} ({f['stage']}): {f['error']}" for f in failures]
        write_text(self.out / "report.md", "\n".join(lines) + "\n")
        return report

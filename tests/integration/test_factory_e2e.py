"""klong-factory end to end on CPU: PDFs made at test time (reportlab), an arXiv-style LaTeX archive, Markdown
papers and one REAL PaperBench paper.md (../shared/data/paperbench_tasks/stochastic-interpolants), through
collect -> filter (with the LLM judgement) -> rubric -> blacklist (+ addendum) -> task folders, against a scripted
OpenAI-compatible LLM double (factory_llm_double.py). A corrupt PDF, an endpoint that answers 500 and a rubric
that never validates end as recorded failures with reasons; the task folders load with klong-eval's loader; a
second run redoes nothing; a run killed with SIGKILL mid-rubric resumes without repeating finished papers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factory_llm_double import FactoryLLMDouble
from factory_papers import make_corrupt_pdf, make_latex_archive, make_markdown, make_pdf

from klong_megatron.cli.eval import run as eval_run
from klong_megatron.cli.factory import run
from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.eval import EvalConfig
from klong_megatron.config.factory import BlacklistConfig, CollectConfig, FactoryConfig, FilterConfig
from klong_megatron.eval.runner import load_tasks
from klong_megatron.tasks.paperbench import parse_blacklist

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "paperbench_tasks" / "stochastic-interpolants"


def _inputs(d: Path) -> Path:
    d.mkdir()
    make_pdf(d / "widgets.pdf", "Sparse Widgets for Tabular Learning")
    make_pdf(d / "widgets-copy.pdf", "Sparse Widgets for Tabular Learning")  # same text: a duplicate
    make_corrupt_pdf(d / "broken.pdf")
    make_latex_archive(d / "gadgets.tar.gz", "Dense Gadgets via LaTeX")
    make_markdown(d / "endpoint.md", "Endpoint Down Paper", "ENDPOINT-DOWN")
    make_markdown(d / "never.md", "Never Valid Paper", "NEVER-VALID")
    make_markdown(d / "repair.md", "Needs Repair Paper", "NEEDS-REPAIR")
    shutil.copy(REAL / "paper.md", d / "stochastic-interpolants.md")
    return d


def test_factory_end_to_end_failures_recorded_and_rerun_redoes_nothing(tmp_path: Path) -> None:
    inputs, out = _inputs(tmp_path / "in"), tmp_path / "out"
    with FactoryLLMDouble() as llm:
        cfg = FactoryConfig(
            output_dir=str(out), concurrency=4, progress=False,
            llm=ChatEngineConfig(base_url=llm.url, max_attempts=2, backoff_s=0.01),
            collect=CollectConfig(inputs=[str(inputs)]), filter=FilterConfig(min_chars=2000, llm=True),
            blacklist=BlacklistConfig(addendum=True), reference_rubrics=str(REAL.parents[1] / "paperbench_rubrics"),
        )  # fmt: skip
        report = run(cfg, str(out))
        served = llm.served
        again = run(cfg, str(out))
        retried = [b["messages"][1]["content"] for b in llm.requests[served:]]

    failures = {f["paper"]: (f["stage"], f["error"]) for f in report["failures"]}
    assert set(failures) == {"broken", "endpoint", "never"}
    assert failures["broken"][0] == "collect" and "no readable pages (corrupt" in failures["broken"][1]
    assert failures["endpoint"][0] == "filter" and "HTTP 500" in failures["endpoint"][1]
    assert failures["never"][0] == "rubric" and "'Code Writing'" in failures["never"][1]
    assert report["papers"]["widgets-copy"]["duplicate_of"] == "widgets"
    assert report["llm_usage"]["repairs"] >= 3  # NEEDS-REPAIR: each of its steps' first answers was refused

    tasks = {t.task_id: t for t in load_tasks([str(out / "tasks")])}  # klong-eval's loader
    assert set(tasks) == {"gadgets", "repair", "stochastic-interpolants", "widgets"}
    for t in tasks.values():
        assert len(list(t.rubric.leaves())) == 3 * 2 * 3 and t.rubric.depth() == 3
        assert t.addendum.startswith("Use any public implementation")
    real = tasks["stochastic-interpolants"]
    assert real.title == "Stochastic Interpolants with Data-Dependent Couplings"
    assert real.blacklist == parse_blacklist((REAL / "blacklist.txt").read_text(), "real")
    assert tasks["widgets"].blacklist == ["https://github.com/acme/sparse-widgets"] and tasks["widgets"].has_pdf
    assert "PaperBench (n=3)" in report["rubric_table"]
    summary = eval_run(EvalConfig(tasks=[str(out / "tasks")], dry_run=True), tmp_path / "eval")
    assert sorted(summary["tasks"]) == sorted(tasks)

    assert all(r["done"] == 0 for r in again["stages"].values())  # nothing finished is redone ...
    assert retried and all("ENDPOINT-DOWN" in u or "NEVER-VALID" in u for u in retried)  # only failures retried
    assert {f["paper"] for f in again["failures"]} == {"broken", "endpoint", "never"}

    # A file added later whose id an earlier file already holds is refused, not mixed up with it.
    make_markdown(inputs / "widgets.md", "Other Widgets")  # sorts before widgets.pdf: would take the id "widgets"
    cfg.stages = ["collect"]
    clash = [f for f in run(cfg, str(out))["failures"] if f["paper"].endswith("widgets.md")]
    assert len(clash) == 1 and "paper id 'widgets' already holds local:" in clash[0]["error"]


def test_factory_killed_mid_rubric_resumes_without_redoing_finished_papers(tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for i in range(6):
        make_markdown(inputs / f"paper{i}.md", f"Paper number {i} on widgets")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with FactoryLLMDouble(delay_s=0.15) as llm:
        cmd = [sys.executable, "-m", "klong_megatron.cli.factory", f"output_dir={out}", f"collect.inputs=[{inputs}]",
               "filter.min_chars=2000", "concurrency=2", "progress=false", f"llm.base_url={llm.url}"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not list(out.glob("papers/*/rubric.done.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = {p.parent.name for p in out.glob("papers/*/rubric.done.json")}
        assert 1 <= len(done_before) < 6, proc.stdout.read().decode()[-2000:]
        titles = {json.loads((out / "papers" / d / "meta.json").read_text())["title"] for d in done_before}
        llm.delay_s = 0.0
        cfg = FactoryConfig(output_dir=str(out), concurrency=2, progress=False, filter=FilterConfig(min_chars=2000),
                            llm=ChatEngineConfig(base_url=llm.url),
                            collect=CollectConfig(inputs=[str(inputs)]))  # fmt: skip
        report = run(cfg, str(out))  # the same run, resumed in this process
    assert not report["failures"]
    assert report["stages"]["rubric"]["skipped"] == len(done_before)
    for title in titles:  # a finished rubric was never asked for again
        assert llm.per_paper[f"Paper: {title}"] == 1
    assert len(load_tasks([str(out / "tasks")])) == 6
    assert not list(out.glob("tasks/.*"))  # no half-built task folder left behind


@pytest.mark.bwrap
def test_factory_all_six_stages_paper_to_kept_sft_trajectory(tmp_path: Path) -> None:
    """The whole chain in one app run: a Markdown paper -> task folder -> stage 6 (factory/distil.py) with the
    scripted teacher (openai_agent_double.py, an honest attempt) and judge doubles in bubblewrap sandboxes."""
    from distil_tasks import judge_script
    from openai_agent_double import OpenAIAgentDouble, PaperScript
    from openai_judge_double import OpenAIJudgeDouble

    from klong_megatron.config.distil import DistilConfig
    from klong_megatron.config.judge import JudgeConfig
    from klong_megatron.config.reproduce import ReproduceConfig
    from klong_megatron.config.sandbox import SandboxConfig

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    make_markdown(inputs / "widgets.md", "Sparse Widgets for Tabular Learning")
    sandbox = SandboxConfig(backend="bwrap", memory_mb=2048)
    fast = {"max_attempts": 2, "backoff_s": 0.01, "backoff_max_s": 0.02}
    with FactoryLLMDouble() as llm, OpenAIAgentDouble(PaperScript()) as teacher, \
            OpenAIJudgeDouble(judge_script) as judge:  # fmt: skip
        distil = DistilConfig(
            teacher=ChatEngineConfig(base_url=teacher.url, model="teacher-double", **fast), sandbox=sandbox,
            reproduce=ReproduceConfig(timeout_s=60, sandbox=sandbox), samples=1, time_limit_s=120, max_turns=20,
            judge=JudgeConfig(endpoints=[judge.url], model="judge-double", use_checks=False, rank_files=False, **fast),
        )  # fmt: skip
        stages = ["collect", "filter", "rubric", "blacklist", "tasks", "distil"]
        cfg = FactoryConfig(stages=stages, progress=False, llm=ChatEngineConfig(base_url=llm.url, **fast),
                            distil=distil, collect=CollectConfig(inputs=[str(inputs)]),
                            filter=FilterConfig(min_chars=2000))  # fmt: skip
        report = run(cfg, str(out))
    assert not report["failures"], report["failures"]
    assert report["stages"]["distil"]["tasks"] == 1 and report["stages"]["distil"]["attempts_kept"] == 1
    kept = [json.loads(x) for x in (out / "distil" / "sft.jsonl").read_text().splitlines()]
    assert [r["meta"]["task"] for r in kept] == ["widgets"] and kept[0]["tools"]
    assert report["papers"]["widgets"]["tasks"] == "done" and report["stages"]["distil"]["done"] == 1

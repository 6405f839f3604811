"""klong-eval end to end on the REAL PaperBench task folders (../shared/data/paperbench_tasks): a scripted
OpenAI-compatible model double (tests/integration/openai_agent_double.py) works in bubblewrap sandboxes
with the paper mounted read-only, reproduce.sh runs in a fresh sandbox, and the real judge pipeline
(LLM grader, queue, cache) asks a scripted judge double (openai_judge_double.py) about every rubric leaf.

Scripted outcomes: mechanistic-understanding (blacklist https://github.com/ajyl/dpo_toxic) has one honest
sample and one that tries to clone the official repo (refused, flagged, score 0); semantic-self-consistency
submits no reproduce.sh (recorded as missing); the judge cannot grade stochastic-interpolants' execution and
result leaves (11 of 69 leaves invalid, above max_invalid_frac 0.1: the sample is excluded from the means,
never a silent 0).
Every sample writes a FAKE reproduce.log; the judge must only ever see the real one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from klong_megatron.cli.eval import run
from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.eval import EvalConfig
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.sandbox import SandboxConfig
from tests.integration.openai_agent_double import FAKE_LOG, REAL_MARK, OpenAIAgentDouble, PaperScript
from tests.integration.openai_judge_double import OpenAIJudgeDouble, Reply

pytestmark = pytest.mark.bwrap

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT.parent / "shared" / "data" / "paperbench_tasks"
if not TASKS.is_dir():
    pytest.skip(f"real PaperBench task folders not found at {TASKS}", allow_module_level=True)

GRADE = "# Expectations\nscripted\n# Reality\nscripted by the judge double\n# Score\n{}"


class JudgeScript:
    """Judge double: execution/result leaves score 1 when the log shows the real run; code leaves when main.py
    is among the files; stochastic-interpolants' log-based leaves get unparseable replies (invalid)."""

    def __init__(self) -> None:
        self.logs: list[str] = []

    def __call__(self, body: dict) -> Reply | str:
        text = "\n".join(m["content"] for m in body["messages"])
        log = re.search(r"<reproduce\.log>\n(.*?)\n</reproduce\.log>", text, re.DOTALL)
        if log is None:
            return GRADE.format(1 if "main.py" in text else 0)
        self.logs.append(log.group(1))
        if "Stochastic Interpolants" in body["messages"][1]["content"][:3000]:
            return "I cannot decide."
        return GRADE.format(1 if REAL_MARK in log.group(1) else 0)


def _cfg(model_url: str, judge_url: str, out: Path, samples: int = 2) -> EvalConfig:
    sandbox = SandboxConfig(backend="bwrap", memory_mb=2048)
    return EvalConfig(
        tasks=[str(TASKS)],
        engine="chat",
        chat=ChatEngineConfig(base_url=model_url, model="double", backoff_s=0.01, backoff_max_s=0.05),
        sandbox=sandbox,
        reproduce=ReproduceConfig(timeout_s=60, sandbox=sandbox),
        judge=JudgeConfig(
            endpoints=[judge_url],
            model="judge-double",
            use_checks=False,
            rank_files=False,
            max_attempts=2,
            backoff_s=0.01,
            backoff_max_s=0.02,
        ),  # fmt: skip
        samples=samples,
        concurrency=3,
        time_limit_s=120,
        max_turns=20,
        max_invalid_frac=0.1,
        output_dir=str(out),
    )


def _results(out: Path) -> dict[str, dict]:
    return {(r := json.loads(line))["id"]: r for line in (out / "results.jsonl").read_text().splitlines()}


def test_eval_real_paper_tasks_end_to_end_with_real_reproduction_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    script = PaperScript(
        plans={"Mechanistic Understanding": ["honest", "cheat"], "Semantic Self-Consistency": ["noscript"]}
    )
    judge = JudgeScript()
    with OpenAIAgentDouble(script, fail_first=2) as model, OpenAIJudgeDouble(judge) as jsrv:
        summary = run(_cfg(model.url, jsrv.url, out), out)
        requests_first = len(model.requests)
        res = _results(out)
        assert len(res) == 6 and summary["stats"]["failed"] == 0

        # The agent saw the instructions with the real paths and the tool schemas.
        first = model.requests[2]
        assert (
            "/paper/paper.md" in first["messages"][1]["content"]
            and "/workspace/submission" in first["messages"][1]["content"]
        )
        assert {t["function"]["name"] for t in first["tools"]} >= {"bash", "write_file", "submit"}

        for rid, r in res.items():
            meta, msgs = r["meta"], r["messages"]
            tool_texts = [m["content"] for m in msgs if m["role"] == "tool"]
            assert any("Introduction" in t or "title" in t.lower() for t in tool_texts[:1]), rid  # paper read
            assert "write_rc=0" not in tool_texts[1], f"{rid}: the paper dir was writable: {tool_texts[1]}"
            assert tool_texts[2].startswith("Error") and "JSON" in tool_texts[2]  # malformed call -> observation
            if meta["blacklist_flagged"]:
                assert meta["graded_dir"] is None and meta["reproduce"] is None  # nothing ran for a flagged rollout
                continue
            graded = Path(meta["graded_dir"])
            log = (graded / "reproduce.log").read_text()
            assert FAKE_LOG not in log
            task = meta["task"]
            if task == "semantic-self-consistency":
                assert meta["reproduce"]["missing_script"] and "not found" in log
            else:
                assert meta["reproduce"]["exit_code"] == 0 and REAL_MARK in log, log
                assert (graded / "results" / "metrics.json").stat().st_mtime >= meta["reproduce"]["log_created_at"]
                assert (graded / "main.py").stat().st_mtime < meta["reproduce"]["log_created_at"]
                assert json.loads((graded / "reproduce.meta.json").read_text()) == meta["reproduce"]

        mech = [r["meta"] for r in res.values() if r["meta"]["task"] == "mechanistic-understanding"]
        flagged = [m for m in mech if m["blacklist_flagged"]]
        assert len(flagged) == 1 and flagged[0]["reward"] == 0.0 and flagged[0]["blacklist_refused"]
        assert flagged[0]["blacklist_violations"][0]["url"] == "github.com/ajyl/dpo_toxic"
        honest = [m for m in mech if not m["blacklist_flagged"]][0]
        assert honest["reward"] == 1.0 and honest["judge_invalid_frac"] == 0.0
        stoch = [r["meta"] for r in res.values() if r["meta"]["task"] == "stochastic-interpolants"]
        assert all(
            m["reward_excluded"] and m["judge_invalid_frac"] > 0.1 and len(m["judge_invalid"]) == 11 for m in stoch
        )
        assert all(FAKE_LOG not in log for log in judge.logs) and any(REAL_MARK in log for log in judge.logs)

        t = summary["tasks"]
        assert t["stochastic-interpolants"]["n"] == 0 and t["stochastic-interpolants"]["excluded"] == 2
        assert t["mechanistic-understanding"]["flagged"] == 1 and t["mechanistic-understanding"]["mean"] == 0.5
        assert t["mechanistic-understanding"]["stderr"] == pytest.approx(0.5)
        html = (out / "report.html").read_text()
        assert "http://" not in html.split("<h2>Transcripts")[0] and "<script" not in html
        assert html.count("<details id='t-") == 6 and "EXCLUDED" in html and "FLAGGED" in html
        assert "scripted by the judge double" in html  # leaf explanations

        # Resume: the same command again runs nothing and grades nothing.
        served = jsrv.served
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        overrides = [f"tasks=[{TASKS}]", f"output_dir={out}", f"hydra.run.dir={out}/hydra", "samples=2",
                     f"chat.base_url={model.url}", f"judge.endpoints=[{jsrv.url}]", "sandbox=bwrap",
                     "judge.context_window=null", "judge.tokenizer=null"]  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "klong_megatron.cli.eval", *overrides], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "0 graded now, 6 already done, 0 failed" in proc.stdout
        assert len(model.requests) == requests_first and jsrv.served == served
        assert "mechanistic-understanding" in proc.stdout and "+-" in proc.stdout


def test_eval_endpoint_errors_are_reported_not_stored(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    with OpenAIAgentDouble(status=401) as model, OpenAIJudgeDouble(JudgeScript()) as jsrv:
        cfg = _cfg(model.url, jsrv.url, out, samples=1)
        cfg.tasks = [str(TASKS / "semantic-self-consistency")]
        summary = run(cfg, out)
    assert summary["stats"]["failed"] == 1 and "HTTP 401" in summary["stats"]["errors"][0]
    assert len(model.requests) == cfg.max_attempts  # a 401 is not retried within an attempt
    assert (out / "results.jsonl").read_text() == ""


def test_eval_token_engine_on_a_devserver(tmp_path: Path) -> None:
    """engine=sglang (the RL agent loop: chat template, token ids, log-probs) against a klong-devserver running
    the tiny random model: the sample is rolled out, reproduced (nothing to run) and judged."""
    from klong_megatron.config.data import ContextPolicyConfig, DataConfig
    from klong_megatron.config.rollout import RolloutConfig, SamplingConfig

    cmd = [
        sys.executable,
        "-m",
        "klong_megatron.cli.devserver",
        "--port",
        "0",
        "--max-context",
        "8192",
        "--threads",
        "1",
    ]
    dev = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        line = dev.stdout.readline()
        assert "listening on" in line, line
        url = line.strip().rsplit(" ", 1)[-1]
        with OpenAIJudgeDouble(JudgeScript()) as jsrv:
            cfg = _cfg("http://unused:1", jsrv.url, tmp_path / "eval", samples=1)
            cfg.tasks = [str(TASKS / "semantic-self-consistency")]
            cfg.engine, cfg.max_turns = "sglang", 2
            cfg.rollout = RolloutConfig(engine="sglang", servers=[url], sampling=SamplingConfig(max_new_tokens=16))
            cfg.data = DataConfig(tokenizer="byte", policy=ContextPolicyConfig(max_len=8192, gen_reserve=64,
                                                                               max_prefix_tokens=6000))  # fmt: skip
            summary = run(cfg, tmp_path / "eval")
    finally:
        dev.terminate()
        dev.wait(timeout=30)
    assert summary["stats"]["failed"] == 0 and summary["stats"]["done"] == 1
    (rec,) = _results(tmp_path / "eval").values()
    assert rec["meta"]["turns"] == 2 and len(rec["meta"]["steps"]) == 2  # token-level record of each turn
    assert rec["meta"]["reproduce"]["missing_script"] and not rec["meta"]["reward_excluded"]

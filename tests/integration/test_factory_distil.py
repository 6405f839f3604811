"""Research-Factory distillation end to end on CPU: a scripted OpenAI-compatible TEACHER double
(openai_agent_double.py, with reasoning_content) works on the REAL PaperBench task mechanistic-understanding
(../shared/data/paperbench_tasks) and on task folders made here, in bubblewrap sandboxes; reproduce.sh runs in a
fresh sandbox and the real judge pipeline asks a scripted judge double (openai_judge_double.py) about every leaf.

Scripted outcomes (plans are given by conversation start order, so assertions go by each attempt's plan):
honest attempts score 1 and are exact duplicates of each other (one kept per task, the rest near_duplicate);
a cheat attempt clones the blacklisted official repo (blacklist); noscript submits no reproduce.sh (1/3 <
min_score); every request about the "Flaky Widget" task gets HTTP 500 (recorded failures, the run goes on).
The kept trajectories load into the SFT dataset with the real Qwen3 tokenizer and chat template.
A run killed mid-way resumes without asking the teacher again for attempts it finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.data import ContextPolicyConfig, DataConfig
from klong_megatron.config.distil import DistilConfig
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.data.render import Renderer
from klong_megatron.data.trajectory import read_trajectories
from klong_megatron.factory.distil import run_distil
from tests.integration.distil_tasks import judge_script, make_task
from tests.integration.openai_agent_double import OpenAIAgentDouble, PaperScript
from tests.integration.openai_chat_double import Reply
from tests.integration.openai_judge_double import OpenAIJudgeDouble

pytestmark = pytest.mark.bwrap

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
REAL_TASK = SHARED / "data" / "paperbench_tasks" / "mechanistic-understanding"
QWEN3 = SHARED / "real_tokenizers" / "qwen3"
if not REAL_TASK.is_dir() or not QWEN3.is_dir():
    pytest.skip(f"real PaperBench task / tokenizer not found under {SHARED}", allow_module_level=True)


class Teacher(OpenAIAgentDouble):
    """The scripted teacher; any request about the Flaky Widget paper gets HTTP 500."""

    def answer(self, body: dict, n: int) -> Reply:
        if "Flaky Widget" in body["messages"][1]["content"]:
            return Reply("upstream exploded (scripted)", status=500)
        return super().answer(body, n)


def config(teacher: str, judge_url: str, **kw: object) -> DistilConfig:
    sandbox = SandboxConfig(backend="bwrap", memory_mb=2048)
    jcfg = JudgeConfig(endpoints=[judge_url], model="judge-double", use_checks=False, rank_files=False,
                       max_attempts=2, backoff_s=0.01, backoff_max_s=0.02)  # fmt: skip
    teacher_cfg = ChatEngineConfig(base_url=teacher, model="teacher-double", max_attempts=2, backoff_s=0.01,
                                   backoff_max_s=0.02)  # fmt: skip
    base = dict(teacher=teacher_cfg, sandbox=sandbox, reproduce=ReproduceConfig(timeout_s=60, sandbox=sandbox),
                judge=jcfg, samples=3, concurrency=4, time_limit_s=120, max_turns=20, min_score=0.5)  # fmt: skip
    return DistilConfig(**{**base, **kw})


def plan_of(rec: dict) -> str:
    first = next(m for m in rec["messages"] if m["role"] == "assistant")
    return first["content"].split("plan: ", 1)[1].split()[0]


def complete_ids(path: Path) -> set[str]:
    out = set()
    for x in path.read_text().splitlines():
        try:
            out.add(json.loads(x)["id"])
        except json.JSONDecodeError:
            pass
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_distil_real_and_generated_tasks_keeps_good_unique_attempts_and_records_failures(tmp_path: Path) -> None:
    tiny = make_task(tmp_path / "tasks", "tiny-widget", "Tiny Widget")
    flaky = make_task(tmp_path / "tasks", "flaky-widget", "Flaky Widget")
    script = PaperScript(plans={"Mechanistic Understanding": ["honest", "cheat", "honest"],
                                "Tiny Widget": ["noscript", "honest", "honest"]}, reasoning=True)  # fmt: skip
    out = tmp_path / "distil"
    with Teacher(script) as teacher, OpenAIJudgeDouble(judge_script) as jsrv:
        sheet = run_distil(config(teacher.url, jsrv.url, tokenizer=str(QWEN3)), [REAL_TASK, tiny, flaky], out)

    graded = {r["id"]: r for r in lines(out / "attempts" / "results.jsonl")}
    decisions = {d["id"]: d for d in lines(out / "decisions.jsonl")}
    assert set(graded) == set(decisions) and len(graded) == 6
    by_plan: dict[tuple[str, str], list[dict]] = {}
    for rid, rec in graded.items():
        by_plan.setdefault((rec["meta"]["task"], plan_of(rec)), []).append(decisions[rid])
    mech, tw = "mechanistic-understanding", "tiny-widget"
    assert [d["reason"] for d in by_plan[(mech, "cheat")]] == ["blacklist"]
    assert [d["reason"] for d in by_plan[(tw, "noscript")]] == ["below_threshold"]
    assert abs(by_plan[(tw, "noscript")][0]["score"] - 1 / 3) < 1e-6  # only the code leaf holds
    for task in (mech, tw):
        honest = sorted(by_plan[(task, "honest")], key=lambda d: d["reason"])
        assert [d["reason"] for d in honest] == ["kept", "near_duplicate"] and honest[0]["score"] == 1.0
        assert honest[1]["duplicate_of"] == honest[0]["id"] and honest[1]["similarity"] == 1.0

    # The failing endpoint: every attempt of the flaky task recorded with its reasons; nothing else lost.
    fails = {f["id"]: f for f in lines(out / "attempts" / "failures.jsonl")}
    assert set(fails) == {f"flaky-widget/{k}" for k in range(3)}
    assert all(len(f["errors"]) == 2 and "HTTP 500" in f["errors"][-1] for f in fails.values())
    assert sheet["attempts"] == {"planned": 9, "graded": 6, "failed": 3, "pending": 0, "kept": 2}
    assert sheet["failure_kinds"] == {"ChatEngineError": 3}
    assert sheet["decisions"]["near_duplicate"] == 2 and sheet["histograms"]["score_all"]["counts"][-1] == 4
    assert sheet["cost_tokens"]["teacher_completion"] == 10 * sum(r["meta"]["turns"] for r in graded.values())
    assert sheet["cost_tokens"]["judge_calls"] > 2 * 96  # every leaf of the real rubric, for both honest attempts
    md = (out / "datasheet.md").read_text()
    assert "kept 2" in md and "flaky-widget/0: ChatEngineError" in md
    assert json.loads((out / "datasheet.json").read_text()) == sheet

    # The SFT file: kept attempts with their tools and the teacher's reasoning, loaded by the SFT dataset.
    sft = lines(out / "sft.jsonl")
    assert sorted(r["meta"]["task"] for r in sft) == [mech, tw]
    for r in sft:
        assert {t["function"]["name"] for t in r["tools"]} >= {"bash", "write_file", "submit"}
        assert r["messages"][0]["pinned"] and r["messages"][1]["pinned"]
        assert all(m["reasoning_content"].startswith("Thinking") for m in r["messages"] if m["role"] == "assistant")
    from klong_megatron.data.dataset import build_sft_datasets

    sft_path = out / "sft.jsonl"
    dcfg = DataConfig(train_files=[str(sft_path)], tokenizer=str(QWEN3), valid_fraction=0.0,
                      policy=ContextPolicyConfig(max_len=32768))  # fmt: skip
    train, _ = build_sft_datasets(dcfg, progress=False)
    assert sorted(w.trajectory_id for w in train.windows) == sorted(r["id"] for r in sft)  # one window each
    renderer = Renderer(train.tokenizer)
    assert sheet["student_tokens_kept"] == sum(len(renderer.render(t).input_ids) for t in read_trajectories(sft_path))
    for w in train.windows:
        text = train.tokenizer.decode(w.input_ids.tolist())
        assert "<think>" in text and "Thinking (honest)" in text and '"name": "write_file"' in text
        trained = train.tokenizer.decode(w.input_ids[w.loss_mask.astype(bool)].tolist())
        assert "Thinking (honest)" in trained and "Reproduce the research paper" not in trained


DRIVER = """
import json, sys
sys.path.insert(0, {root!r})
from tests.integration.test_factory_distil import config
from klong_megatron.factory.distil import run_distil
a = json.loads(sys.argv[1])
run_distil(config(a["teacher"], a["judge"], samples=3, concurrency=1), a["tasks"], a["out"])
"""


def test_distil_killed_mid_run_resumes_without_redoing_finished_attempts(tmp_path: Path) -> None:
    tasks = [make_task(tmp_path / "tasks", n, t) for n, t in (("alpha", "Alpha Widget"), ("beta", "Beta Widget"))]
    out = tmp_path / "distil"
    results = out / "attempts" / "results.jsonl"
    with OpenAIAgentDouble() as teacher, OpenAIJudgeDouble(judge_script) as jsrv:
        teacher.delay_s = 0.05
        args = {"teacher": teacher.url, "judge": jsrv.url, "tasks": [str(t) for t in tasks], "out": str(out)}
        script = tmp_path / "driver.py"
        script.write_text(DRIVER.format(root=str(ROOT)))
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if results.exists() and len(results.read_text().splitlines()) >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        rolled = complete_ids(out / "attempts" / "rollouts.jsonl")  # the kill may have torn the last line
        graded_before = [x for x in results.read_text().splitlines() if x.strip()][: len(complete_ids(results))]
        assert 2 <= len(graded_before) < 6 and (out / "sft.jsonl").exists() is False
        starts_before = sum(not any(m["role"] == "assistant" for m in b["messages"]) for b in teacher.requests)

        teacher.delay_s = 0.0
        sheet = run_distil(config(teacher.url, jsrv.url, samples=3, concurrency=1), tasks, out, progress=True)
        starts = sum(not any(m["role"] == "assistant" for m in b["messages"]) for b in teacher.requests)
    assert starts - starts_before == 6 - len(rolled)  # finished attempts were not asked for again
    after = results.read_text().splitlines()
    assert after[: len(graded_before)] == graded_before and len({json.loads(x)["id"] for x in after}) == 6
    assert sheet["attempts"]["graded"] == 6 and sheet["attempts"]["kept"] == 2  # one honest per task, rest duplicates


@pytest.mark.docker
def test_distil_in_docker_sandboxes_keeps_one_of_two_identical_honest_attempts(tmp_path: Path) -> None:
    task = make_task(tmp_path / "tasks", "gamma", "Gamma Widget")
    sandbox = SandboxConfig(backend="docker", memory_mb=1024)
    with OpenAIAgentDouble() as teacher, OpenAIJudgeDouble(judge_script) as jsrv:
        cfg = config(teacher.url, jsrv.url, samples=2, concurrency=2, sandbox=sandbox,
                     reproduce=ReproduceConfig(timeout_s=60, sandbox=sandbox))  # fmt: skip
        sheet = run_distil(cfg, [task], tmp_path / "distil")
    graded = lines(tmp_path / "distil" / "attempts" / "results.jsonl")
    assert all(r["meta"]["reproduce"]["exit_code"] == 0 and r["meta"]["reward"] == 1.0 for r in graded)
    assert sheet["attempts"]["kept"] == 1 and sheet["decisions"]["near_duplicate"] == 1


def test_distil_judge_down_and_sandbox_that_cannot_start_are_recorded_not_fatal(tmp_path: Path) -> None:
    task = make_task(tmp_path / "tasks", "delta", "Delta Widget")
    with OpenAIAgentDouble() as teacher, OpenAIJudgeDouble(lambda body: Reply("judge down", status=503)) as jsrv:
        cfg = config(teacher.url, jsrv.url, samples=1)
        cfg.judge.retry_timeout_s = 0.2  # then the leaf is invalid: the attempt cannot be kept
        sheet = run_distil(cfg, [task], tmp_path / "judge_down")
        assert sheet["decisions"]["judge_invalid"] == 1 and sheet["attempts"]["kept"] == 0
        assert not (tmp_path / "judge_down" / "sft.jsonl").read_text()

        broken = SandboxConfig(backend="bwrap", memory_mb=1024, ro_binds=[str(tmp_path / "missing") + ":/x"])
        sheet = run_distil(config(teacher.url, jsrv.url, samples=2, sandbox=broken), [task], tmp_path / "no_sandbox")
    assert sheet["attempts"] == {"planned": 2, "graded": 0, "failed": 2, "pending": 0, "kept": 0}
    assert all(len(f["errors"]) == 2 for f in sheet["failures"]) and "missing" in sheet["failures"][0]["errors"][0]

"""``klong-rl tasks.source=dir`` on the REAL PaperBench task folders (../shared/data/paperbench_tasks): the
tiny random policy (dev server) works in bubblewrap sandboxes with the paper read-only at /paper, every
rollout goes through the reproduction step and the real judge pipeline with a scripted judge double
(tests/integration/openai_judge_double.py), and a rollout whose leaves the judge cannot grade is left
out of the GRPO update instead of entering it as 0.

The judge double answers "# Score 1" for Code Development leaves of semantic-self-consistency and an
unparseable reply for every leaf of stochastic-interpolants it asks about (invalid share > rl.max_invalid_frac).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.openai_judge_double import OpenAIJudgeDouble, Reply

pytestmark = pytest.mark.bwrap

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT.parent / "shared" / "data" / "paperbench_tasks"
if not TASKS.is_dir():
    pytest.skip(f"real PaperBench task folders not found at {TASKS}", allow_module_level=True)


def _judge(body: dict) -> Reply | str:
    paper = body["messages"][1]["content"][:3000]
    if "Stochastic Interpolants" in paper:
        return "I cannot tell."
    code_dev = "of type Code Development" in body["messages"][-2]["content"]
    return f"# Expectations\nx\n# Reality\ny\n# Score\n{1 if code_dev else 0}"


def test_klong_rl_on_real_paper_task_folders(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with OpenAIJudgeDouble(_judge) as judge:
        cmd = [
            sys.executable, "-m", "klong_megatron.cli.rl", "experiment=rl_demo", "rl.sft_warmup=null",
            "rl.eval_initial=false", f"tasks.dir={TASKS}", "tasks.source=dir", "tasks.num_eval=1",
            "stages=[{timeout_s:60,iterations:1,rollouts_per_task:2,tasks_per_iteration:2}]",
            "rollout.max_turns=2", "rollout.sampling.max_new_tokens=32", "rollout.concurrency=2",
            "algo.filter_zero_variance=false", "trainer.global_batch_size=2", "data.policy.max_len=2048",
            "data.policy.max_prefix_tokens=1200",  # the paper-task prompt is ~850 demo-BPE tokens
            "judge.use_llm=true", "judge.use_checks=false", f"judge.endpoints=[{judge.url}]", "judge.rank_files=false",
            "judge.max_attempts=1", "reproduce.sandbox.backend=bwrap", "reproduce.timeout_s=30",
            f"output_dir={out}", f"hydra.run.dir={out}/hydra",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = json.loads((out / "rl_state.json").read_text())
    assert state["stage"] == 1 and state["version"] == 1 and "stage0" in state["scores"]

    rows = [json.loads(line) for line in (out / "rollouts" / "stage0_iter0000.jsonl").read_text().splitlines()]
    assert (
        sorted(r["meta"]["task"] for r in rows) == ["semantic-self-consistency"] * 2 + ["stochastic-interpolants"] * 2
    )
    for r in rows:
        m = r["meta"]
        prompt = r["messages"][1]["content"]
        assert "/paper/paper.md" in prompt and "/home/submission" in prompt and "60 seconds" in prompt
        assert m["reproduce"]["missing_script"] is True  # a random policy writes no reproduce.sh
        assert Path(m["graded_dir"], "reproduce.meta.json").is_file()
        if m["task"] == "stochastic-interpolants":
            assert (
                m["reward_excluded"] and m["judge_invalid_frac"] > 0.5
            )  # leaves needing no call (no reproduce.sh) stay valid
        else:
            assert not m["reward_excluded"] and 0 < m["reward"] < 1  # Code Development leaves pass
    held = [json.loads(line) for line in (out / "rollouts" / "eval_stage0.jsonl").read_text().splitlines()]
    assert {r["meta"]["task"] for r in held} == {"mechanistic-understanding"}

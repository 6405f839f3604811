"""``klong-rl`` end to end on CPU: dev server over HTTP, bubblewrap sandboxes, check-command judge,
Megatron GRPO updates, weight pushes; SIGKILL and then SIGTERM mid-stage, and resume without re-running
or re-judging.

A random tiny model scores 0 on every rollout, so the groups are zero-variance: the run keeps them
(``algo.filter_zero_variance=false``) to exercise the update path (advantage 0: the loss is the KL and
clipping terms only).
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
from wandb_records import read_run

pytestmark = pytest.mark.bwrap

TINY = [
    "experiment=rl_demo",
    "rl.sft_warmup=null",
    "rl.eval_initial=true",
    "stages=[{timeout_s:15,iterations:4,rollouts_per_task:2,tasks_per_iteration:2}]",
    "rollout.max_turns=2",
    "rollout.sampling.max_new_tokens=32",
    "rollout.concurrency=2",
    "tasks.num_eval=1",
    "rl.eval_samples=1",
    "algo.filter_zero_variance=false",
    "algo.kl_coef=0.01",
    "trainer.global_batch_size=2",
]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "klong_megatron.cli.rl",
        *TINY,
        f"output_dir={out}",
        f"hydra.run.dir={out}/hydra",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def _state(out: Path) -> dict:
    path = out / "rl_state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _signal_at(
    out: Path, iteration: int, sig: signal.Signals, timeout_s: float, *overrides: str
) -> tuple[subprocess.Popen, str]:
    """Start a run in ``out``, send ``sig`` to its process group once it reached ``iteration``; its output."""
    proc = _start(out, *overrides)
    deadline = time.monotonic() + 240
    while _state(out).get("iteration", 0) < iteration and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, sig)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # name what is still running (and holding the output pipe)
        ps = subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-g", str(proc.pid)], capture_output=True,
                            text=True).stdout  # fmt: skip
        os.killpg(proc.pid, signal.SIGKILL)
        tail = (e.output or b"").decode(errors="replace")[-6000:] if isinstance(e.output, bytes) else str(e.output)
        raise AssertionError(f"{signal.Signals(sig).name} did not end the run in {timeout_s} s (exit "
                             f"{proc.poll()}); still running:\n{ps}\noutput:\n{tail}") from None  # fmt: skip
    return proc, log


def test_rl_run_is_killed_mid_stage_and_resumes_without_rejudging(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _, first = _signal_at(out, 1, signal.SIGKILL, timeout_s=30)
    assert _state(out).get("iteration") == 1, first[-4000:]
    judged = (out / "rollouts" / "stage0_iter0000.jsonl").read_bytes()
    judged_ids = [json.loads(line)["id"] for line in judged.splitlines()]
    assert len(judged_ids) == 4

    # SIGTERM (Slurm preemption, scancel) to the whole process group: clean stop, exit 143, nothing left running.
    wandb = ("logger=wandb", "logger.mode=offline")
    proc, second = _signal_at(out, 2, signal.SIGTERM, 60, *wandb)
    assert proc.returncode == 128 + signal.SIGTERM, second[-4000:]
    assert "resumed: stage 0, iteration 1, policy version 1" in second and "stopped by SIGTERM" in second
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes of the stopped run still running: {leftovers}"
    stopped = _state(out)  # iteration 2, or 3 when the signal came during the next update (finished first)
    assert stopped["iteration"] in (2, 3) and stopped["version"] == stopped["iteration"]

    # The last part pushes weights by broadcast (gloo here, NCCL on GPUs) instead of through disk.
    proc = _start(out, *wandb, "rl.weight_sync=distributed")
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-6000:]
    assert f"resumed: stage 0, iteration {stopped['iteration']}, policy version {stopped['version']}" in log
    state = _state(out)
    assert state["stage"] == 1 and state["version"] == 4
    assert set(state["scores"]) == {"initial", "stage0"}
    # The judged rollouts of iteration 0 were neither re-run nor re-judged; later files hold each rollout once.
    assert (out / "rollouts" / "stage0_iter0000.jsonl").read_bytes() == judged
    for i in (1, 2, 3):
        ids = [json.loads(x)["id"] for x in (out / "rollouts" / f"stage0_iter000{i}.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 4
        trajs = [json.loads(x) for x in (out / "rollouts" / f"stage0_iter000{i}.jsonl").read_text().splitlines()]
        assert all("reward" in t["meta"] and t["meta"]["steps"] for t in trajs)
    # Each iteration trained (GRPO metrics logged) and pushed new weights that the server then sampled with.
    for key in ("rl/stage0", "kl", "clip_frac", "entropy", "reward_mean", "windows/windows"):
        assert key in log, key
    last = [json.loads(x) for x in (out / "rollouts" / "stage0_iter0003.jsonl").read_text().splitlines()]
    versions = {s["weight_version"] for t in last for s in t["meta"]["steps"]}
    assert versions <= {"2", "3"} and versions, versions  # partial rollouts: at most one version behind
    evals = [json.loads(x) for x in (out / "rollouts" / "eval_stage0.jsonl").read_text().splitlines()]
    assert {s["weight_version"] for t in evals for s in t["meta"]["steps"]} == {"4"}
    assert (out / "checkpoints" / "latest").exists() and (out / "checkpoints_best" / "latest").exists()
    # The stopped and the resumed part are one W&B run (same id), its steps continuing.
    stopped_run, run_dir = sorted((out / "wandb").glob("offline-run-*"))
    (id_a, steps_a), (id_b, steps_b) = read_run(stopped_run), read_run(run_dir)
    assert id_a == id_b == (out / "wandb_run_id").read_text().strip()
    # The stopped part may have been signalled before it logged; the resumed part continues after the
    # step kept in rl_state.json, never below what the stopped part logged.
    assert steps_b and min(steps_b) == stopped["log_step"] + 1, (stopped, steps_b)
    assert not steps_a or max(steps_a) <= stopped["log_step"], (steps_a, stopped)
    # Each iteration's best and worst rollout as klong-view pages, logged as a W&B artifact.
    pages = sorted(p.name for p in (out / "view").glob("stage0_iter*.html"))
    assert "stage0_iter0003_best.html" in pages and "stage0_iter0003_worst.html" in pages, pages
    assert b"rollouts-stage0-iter0003" in b"".join(p.read_bytes() for p in run_dir.glob("*.wandb"))
    deadline = time.monotonic() + 60  # the W&B service may still be flushing
    while b"rl/stage0/samples" not in b"".join(p.read_bytes() for p in run_dir.glob("*.wandb")):
        assert time.monotonic() < deadline, "no sample-trajectory table in the W&B run"
        time.sleep(0.5)

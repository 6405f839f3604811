"""slurm/rl.sbatch: the printed plan + config check (plain bash), and a CPU RL job on the real local Slurm.

The Slurm job runs the whole launcher path with ``SERVER=dev``: a ``klong-devserver`` started as its own
srun step on the one node, the health wait, the trainer (torchrun, one CPU process) using it as an
SGLang-API rollout server, and the exit trap stopping it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from klong_megatron.config import CONFIG_DIR
from klong_megatron.rl.weight_sync import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "rl.sbatch"

# One short stage, one iteration of 2 tasks x 2 rollouts, one held-out task: ~50 s of job time on 2 CPUs.
SMALL_RL = [
    "experiment=rl_demo",
    "rl.sft_warmup=null",
    "stages=[{timeout_s:20,iterations:1,rollouts_per_task:2,tasks_per_iteration:2}]",
    "tasks.num_eval=1",
    "rl.eval_samples=1",
    "rollout.max_turns=3",
    "rollout.sampling.max_new_tokens=64",
    "rollout.concurrency=2",
]


def tiny_hf_policy(out: Path) -> Path:
    """A random HF Llama with rl_demo's model (``model=tiny`` + its overrides) and tokenizer (what it trains)."""
    import torch
    import transformers

    from klong_megatron.config.model import ModelConfig
    from klong_megatron.data.render import load_tokenizer
    from klong_megatron.megatron.hf import hf_config

    demo = yaml.safe_load((CONFIG_DIR / "experiment" / "rl_demo.yaml").read_text())
    spec = yaml.safe_load((CONFIG_DIR / "model" / "tiny.yaml").read_text())
    spec.pop("defaults")
    spec.update(demo.get("model", {}))
    tokenizer = load_tokenizer(demo["data"]["tokenizer"])
    fields = {k: v for k, v in hf_config(ModelConfig(**spec), tokenizer).items() if k != "model_type"}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp / "run"), **extra}


def _submit_and_wait(tmp: Path, env: dict[str, str], overrides: list[str], timeout_s: float = 300) -> tuple[str, str]:
    """sbatch, poll squeue every second (``sbatch --wait`` polls up to 30 s apart), return (JobState, log)."""
    log = tmp / "job.out"
    cmd = ["sbatch", "--parsable", f"--output={log}", "--time=8", "--cpus-per-task=1", "--gpus-per-node=0",
           str(SCRIPT), *overrides]  # fmt: skip
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still running after {timeout_s:.0f} s\n--- job log ---\n{_read(log)[-6000:]}")
        time.sleep(1)
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = m.group(1) if (m := re.search(r"JobState=(\S+)", info)) else "UNKNOWN"
    return state, _read(log)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slurm
def test_sbatch_rl_job_with_dev_server_completes_every_stage(tmp_path: Path) -> None:
    hf = tiny_hf_policy(tmp_path / "tiny_hf")
    port = free_port()
    env = _env(tmp_path, SERVER="dev", GPUS_PER_NODE="1", GPUS_PER_SERVER="1", INIT_FROM_HF=str(hf),
               ROLLOUT_PORT=str(port), HEALTH_POLL_S="1", HEALTH_TIMEOUT_S="120",
               SERVER_ARGS="--threads 1")  # fmt: skip
    t0 = time.monotonic()
    state, log = _submit_and_wait(tmp_path, env, SMALL_RL)
    server_log = "".join(_read(f) for f in (tmp_path / "run" / "logs").glob(f"server-*-{port}.log"))
    context = f"\n--- job log ---\n{log[-6000:]}\n--- server log ---\n{server_log[-2000:]}"
    assert state == "COMPLETED", f"JobState={state} after {time.monotonic() - t0:.0f} s{context}"
    assert "ended: completed (exit 0)" in log, context
    url = re.search(r"rollout servers: (http://\S+)", log).group(1)
    assert url.endswith(f":{port}") and f"server {url} healthy" in log, context
    assert "stopping 1 server(s)" in log and "servers stopped" in log, context
    assert "still running after" not in log and "Killed" not in server_log, context  # SIGTERM, not SIGKILL
    run = tmp_path / "run"
    rl_state = json.loads((run / "rl_state.json").read_text())
    assert rl_state["stage"] == 1 and rl_state["version"] == 1, rl_state
    assert url in (run / "rollouts" / "stage0_iter0000.jsonl").read_text()  # rollouts went through that server
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / f"iter_{int(latest):07d}" / "metadata.json").exists()
    assert subprocess.run(["pgrep", "-f", f"devserver.*--port {port}"], capture_output=True).returncode == 1


@pytest.mark.slurm
def test_sbatch_server_that_dies_before_healthy_fails_the_job_with_its_log(tmp_path: Path) -> None:
    env = _env(tmp_path, SERVER="dev", GPUS_PER_NODE="1", ROLLOUT_MODEL=str(tmp_path / "no_such_model"),
               ROLLOUT_PORT=str(free_port()), HEALTH_POLL_S="1", HEALTH_TIMEOUT_S="120")  # fmt: skip
    state, log = _submit_and_wait(tmp_path, env, SMALL_RL, timeout_s=120)
    assert state == "FAILED", f"JobState={state}\n{log[-4000:]}"
    assert "exited before it was healthy" in log and "no_such_model" in log and "ended: failed (exit 1)" in log, log
    assert "all 1 server(s) healthy" not in log and not (tmp_path / "run" / "rl_state.json").exists()


def test_dry_run_prints_the_node_split_and_server_urls_and_validates_the_config(tmp_path: Path) -> None:
    env = _env(tmp_path, DRY_RUN="1", NODELIST="n1,n2,n3,n4,n5", TRAIN_NODES="2", ROLLOUT_NODES="2",
               JUDGE_NODES="1", GPUS_PER_NODE="8", GPUS_PER_SERVER="4", INIT_FROM_HF="/models/policy")  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), "experiment=rl_demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "trainer nodes: n1,n2 x 8 proc, rendezvous n1:" in out
    assert "rollout nodes: n3,n4: sglang x 2 per node, 4 device(s) each, model /models/policy" in out
    assert "rollout servers: http://n3:30000 http://n3:30001 http://n4:30000 http://n4:30001" in out
    assert "judge servers: http://n5:31000" in out
    assert "rollout.servers=[http://n3:30000,http://n3:30001,http://n4:30000,http://n4:30001]" in out
    assert "judge.endpoints=[http://n5:31000]" in out and "init_from_hf=/models/policy" in out
    assert "rollout.server_tp=4" in out and "(TP 4 x PP 1 x DP 1 each)" in out
    assert "sglang.launch_server --model-path /models/policy --tp 4 --host 0.0.0.0 --port 30000" in out
    assert "--port 31000 --reasoning-parser gpt-oss" in out  # the judge's reasoning never reaches its score parser
    assert "dry run OK" in out and "engine sglang" in out and "config validated" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_fails_on_a_bad_split_or_override(tmp_path: Path) -> None:
    env = _env(tmp_path, DRY_RUN="1", NODELIST="n1,n2", TRAIN_NODES="2", JUDGE_NODES="1")
    proc = subprocess.run(["bash", str(SCRIPT), "experiment=rl_demo"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "= 3 > 2 nodes" in proc.stderr, proc.stdout + proc.stderr
    env = _env(tmp_path, DRY_RUN="1", NODELIST="n1", SERVER="dev", GPUS_PER_NODE="1")
    proc = subprocess.run(["bash", str(SCRIPT), "experiment=rl_demo", "rl.eval_samples=0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "eval_samples" in out and "ended: failed" in out, out

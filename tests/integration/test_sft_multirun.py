"""``klong-sft --multirun`` sweeps through the submitit launchers (``hydra/launcher=local|slurm_cpu``).

Each sweep trains the small CPU demo for 2 steps per learning rate. A job must finish, keep its own lr in
its composed config and in the lr it logged, checkpoint, and hand its final loss back to Hydra. The Slurm
sweeps run on the real one-node local cluster (``bash slurm/local_cluster.sh start``); a 2-task job there
runs as two gloo ranks (TP=2) and must reproduce the one-task losses. On failure the submitit logs
(``.submitit/<job>/*.out|err``) are printed.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_slurm_sft import cpu_demo_overrides

KLONG_SFT = Path(sys.executable).with_name("klong-sft")
SWEEP_TIMEOUT_S = 300
LRS = ("1e-3", "3e-3")
STEP_LINE = re.compile(r"train step\s+(\d+)\s+loss ([\d.]+)\s+lr ([\d.e+-]+)")


def _start_sweep(tmp: Path, name: str, overrides: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``klong-sft --multirun`` in ``tmp/name``; its jobs are named after the sweep dir (for scancel)."""
    sweep = tmp / name
    cmd = [str(KLONG_SFT), "--multirun", *cpu_demo_overrides(tmp), *overrides, f"hydra.sweep.dir={sweep}",
           f"hydra.launcher.name={_job_name(sweep)}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, sweep


def _job_name(sweep: Path) -> str:
    return f"sweep-{os.getpid()}-{sweep.name}"


def _submitit_logs(sweep: Path) -> str:
    parts = [
        f"--- {p.relative_to(sweep)} ---\n{p.read_text()[-3000:]}" for p in sorted(sweep.glob(".submitit/*/*_log.*"))
    ]
    return "\n".join(parts) or f"(no submitit logs under {sweep})"


def _finish(proc: subprocess.Popen, sweep: Path) -> None:
    """Wait for the sweep (bounded); on failure cancel leftover Slurm jobs and fail with every log."""
    try:
        out, _ = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\n(sweep still running after {SWEEP_TIMEOUT_S} s: killed)"
    if proc.returncode != 0:
        queue = ""
        if shutil.which("squeue"):  # pending jobs too: they have no .submitit folder yet
            queue = subprocess.run(["squeue", "-o", "%i %T %j %R %M"], capture_output=True, text=True).stdout
            subprocess.run(["scancel", f"--name={_job_name(sweep)}"], capture_output=True, timeout=30)
        pytest.fail(f"sweep exited {proc.returncode}\n{out[-4000:]}\n{_submitit_logs(sweep)}\nsqueue:\n{queue}")


def _job(sweep: Path, num: int, task: int = 0) -> dict:
    """What job ``num`` of a sweep left behind: composed config, logged steps, checkpoint, returned loss."""
    job_dir = sweep / str(num)
    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    job_id = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.id
    folder = sweep / ".submitit" / str(job_id)
    log = (folder / f"{job_id}_{task}_log.out").read_text()
    status, job_return = pickle.loads((folder / f"{job_id}_{task}_result.pkl").read_bytes())
    assert status == "success", f"job {num}: {status}\n{_submitit_logs(sweep)}"
    steps = [(int(s), float(loss), float(lr)) for s, loss, lr in STEP_LINE.findall(log)]
    latest = job_dir / "checkpoints" / "latest"
    return {"cfg": cfg, "log": log, "steps": steps, "returned": job_return.return_value,
            "latest": latest.read_text() if latest.exists() else None, "dir": job_dir}  # fmt: skip


def _check_lr_sweep(sweep: Path) -> list[dict]:
    jobs = [_job(sweep, n) for n in range(len(LRS))]
    assert sorted(j["cfg"].trainer.lr for j in jobs) == sorted(float(lr) for lr in LRS)
    for job in jobs:
        t = job["cfg"].trainer
        assert [s for s, _, _ in job["steps"]] == [1, 2], job["log"][-2000:]
        for step, _, lr in job["steps"]:  # warmup: the lr after step s is lr * s / warmup_steps
            assert lr == pytest.approx(t.lr * min(step, t.warmup_steps) / t.warmup_steps, rel=1e-3)
        assert job["latest"] == "2"
        assert (job["dir"] / "checkpoints" / "iter_0000002" / "metadata.json").exists()
        assert math.isfinite(job["returned"])
        assert job["returned"] == pytest.approx(job["steps"][-1][1], abs=1e-4)
    assert jobs[0]["steps"][-1][2] != jobs[1]["steps"][-1][2]
    return jobs


@pytest.mark.usefixtures("hydra_configs")
def test_slurm_launcher_preset_runs_one_task_per_gpu_and_takes_overrides() -> None:
    from hydra import compose

    over = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"]
    launcher = compose(config_name="sft", overrides=over, return_hydra_config=True).hydra.launcher
    assert launcher.tasks_per_node == 4 and launcher.partition == "gpu"
    assert launcher._target_.endswith("SlurmLauncher")
    cpu = compose(config_name="sft", overrides=["hydra/launcher=slurm_cpu"], return_hydra_config=True).hydra.launcher
    assert cpu.gpus_per_node is None and cpu.tasks_per_node == 1 and cpu._target_.endswith("SlurmLauncher")
    local = compose(config_name="sft", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


def test_local_sweep_trains_each_learning_rate_in_its_own_job(tmp_path: Path) -> None:
    proc, sweep = _start_sweep(tmp_path, "local", ["hydra/launcher=local", f"trainer.lr={','.join(LRS)}"])
    _finish(proc, sweep)
    _check_lr_sweep(sweep)


@pytest.mark.slurm
def test_slurm_sweep_runs_a_job_array_and_a_two_task_job_matches_one_task(tmp_path: Path) -> None:
    # Both sweeps are submitted at once; Slurm queues the 2-CPU job behind the array on this 2-CPU node.
    lr_sweep = _start_sweep(tmp_path, "slurm", ["hydra/launcher=slurm_cpu", f"trainer.lr={','.join(LRS)}"])
    tp2 = [
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.tasks_per_node=2",
        "trainer.parallel.tp=2",
        f"trainer.lr={LRS[0]}",
    ]
    tp_sweep = _start_sweep(tmp_path, "slurm_tp2", tp2)
    _finish(*lr_sweep)
    _finish(*tp_sweep)
    jobs = _check_lr_sweep(lr_sweep[1])
    one_task = next(j for j in jobs if j["cfg"].trainer.lr == float(LRS[0]))
    rank0 = _job(tp_sweep[1], 0, task=0)
    _job(tp_sweep[1], 0, task=1)  # rank 1 finished too
    assert "world 2 = TP 2" in rank0["log"]
    assert [(s, lr) for s, _, lr in rank0["steps"]] == [(s, lr) for s, _, lr in one_task["steps"]]
    assert [loss for _, loss, _ in rank0["steps"]] == pytest.approx(
        [loss for _, loss, _ in one_task["steps"]], abs=2e-4
    )
    assert rank0["latest"] == "2"

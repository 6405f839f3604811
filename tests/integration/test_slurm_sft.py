"""slurm/sft.sbatch through a real (local, one-node) Slurm: a CPU SFT job completes and checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slurm


def small_demo_data(tmp: Path, n: int = 3) -> Path:
    """The first ``n`` bundled demo trajectories (keeps data preparation to seconds)."""
    lines = DEMO_TRAJECTORIES.read_text().splitlines()[:n]
    path = tmp / "demo_small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def cpu_demo_overrides(tmp: Path) -> list[str]:
    return [
        "experiment=demo",
        f"data.train_files=[{small_demo_data(tmp)}]",
        "data.valid_fraction=0.0",
        "trainer.train_steps=2",
        "trainer.eval_every=0",
        "trainer.log_every=1",
    ]


def _sbatch(tmp: Path, env_extra: dict[str, str], overrides: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp / "job.out"
    env = {**os.environ, "PYTHON": sys.executable, "GPUS_PER_NODE": "1", "OUT_DIR": str(tmp / "run"), **env_extra}
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", "--time=10", "--cpus-per-task=1", "--gpus-per-node=0",
           str(ROOT / "slurm" / "sft.sbatch"), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, log.read_text() if log.exists() else ""


def test_sbatch_cpu_demo_job_completes_and_writes_a_checkpoint(tmp_path: Path) -> None:
    proc, log = _sbatch(tmp_path, {}, cpu_demo_overrides(tmp_path))
    assert proc.returncode == 0, f"{proc.stderr}\n--- job log ---\n{log[-4000:]}"
    assert "ended: completed (exit 0)" in log
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "2"
    assert (ckpt / "iter_0000002" / "metadata.json").exists()
    assert "train step      2" in log


def test_sbatch_dry_run_validates_the_config_without_training(tmp_path: Path) -> None:
    layout = ["trainer.parallel.tp=2", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"]
    proc, log = _sbatch(tmp_path, {"DRY_RUN": "1", "GPUS_PER_NODE": "8"}, [*cpu_demo_overrides(tmp_path), *layout])
    assert proc.returncode == 0, f"{proc.stderr}\n{log[-3000:]}"
    assert "dry run OK" in log and "TP 2 x PP 1 x CP 1 x DP 4" in log
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sbatch_bad_config_fails_naming_the_field(tmp_path: Path) -> None:
    proc, log = _sbatch(tmp_path, {"DRY_RUN": "1"}, ["experiment=demo", "trainer.global_batch_size=-1"])
    assert proc.returncode != 0
    assert "global_batch_size" in log and "ended: failed" in log


def test_sbatch_requests_gpus_so_a_cluster_without_them_refuses_the_job() -> None:
    """The script asks for --gpus-per-node; this GPU-less test cluster rejects it at submission."""
    proc = subprocess.run(["sbatch", "--parsable", "--test-only", str(ROOT / "slurm" / "sft.sbatch")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode != 0 and "gres" in proc.stderr.lower(), proc.stderr


def test_job_given_gpus_it_cannot_see_stops_before_training(tmp_path: Path) -> None:
    """SLURM_GPUS_ON_NODE set (GPUs allocated) but no visible GPU: exit 1 naming both, no torchrun started."""
    env = {**os.environ, "SLURM_GPUS_ON_NODE": "8", "PYTHON": sys.executable, "OUT_DIR": str(tmp_path / "run")}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "sft.sbatch"), "experiment=demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gave 8 GPU(s) per node but 0 are visible" in proc.stderr

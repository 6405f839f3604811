"""SIGTERM (Slurm preemption) mid-run: the trainer finishes the step, saves a checkpoint and stops.

A SIGTERM to the whole process group during a save lets the save finish, then exits 128 + 15; a run
killed (SIGKILL) mid-save leaves only ``iter_N.partial``, resumes from the previous checkpoint and
rewrites step N; a SIGTERM during the final save of a finished run leaves it completed (exit 0).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_sft import cpu_demo_overrides

DRIVER = Path(__file__).resolve().parent / "sft_driver.py"


def test_sigterm_saves_a_checkpoint_that_resumes_at_the_same_step(tmp_path: Path) -> None:
    cmd = [sys.executable, str(DRIVER), str(tmp_path), "trainer.train_steps=100000", "trainer.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "train step      3" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(seen[-20:]) + out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ended"] == "signal SIGTERM"
    step = summary["state"]["step"]
    assert 3 <= step < 100000
    assert (tmp_path / "checkpoints" / "latest").read_text() == str(step)
    assert (tmp_path / "checkpoints" / f"iter_{step:07d}" / "metadata.json").exists()


# ----- signals that arrive while a checkpoint is being written ---------------------------------------
# slow_save_driver.py makes each checkpoint writer process pause after writing its shards, and the run is
# started in its own session, so the test can signal the whole process group (as Slurm does on
# preemption) while the save is half written.

SLOW_SAVE = Path(__file__).resolve().parent / "slow_save_driver.py"
KLONG_SFT = Path(sys.executable).with_name("klong-sft")


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _signal_group_when(proc: subprocess.Popen, sig: int, *markers: str) -> str:
    """Read the run's output until ``markers`` appeared in this order, then send ``sig`` to its process group."""
    seen, todo = [], list(markers)
    for line in proc.stdout:
        seen.append(line)
        if todo and todo[0] in line:
            todo.pop(0)
            if not todo:
                os.killpg(proc.pid, sig)
                break
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        rest += "\n(still running 120 s after the signal: killed)"
    out = "".join(seen) + rest
    assert not todo, f"the run ended before {todo[0]!r} was printed:\n{out[-4000:]}"
    return out


def test_sigterm_during_a_save_finishes_it_then_exits_with_the_preemption_code_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*cpu_demo_overrides(tmp_path), f"hydra.run.dir={run}"]
    proc = _start(
        [sys.executable, str(SLOW_SAVE), "2", "cli", *common, "trainer.train_steps=50", "trainer.save_every=2"]
    )
    out = _signal_group_when(proc, signal.SIGTERM, "train step      2", "checkpoint writer")
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert "run ended at step 2: signal SIGTERM" in out, out[-4000:]
    assert "train step      3" not in out  # stopped right after the save it was in, no extra step
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "2"
    assert (ckpt / "iter_0000002" / "metadata.json").exists()
    assert not list(ckpt.glob("*.partial"))

    resumed = _run([str(KLONG_SFT), *common, "trainer.train_steps=3", "trainer.save_every=0"])
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert "resumed at step 2" in log and "run ended at step 3: completed" in log
    assert (ckpt / "latest").read_text() == "3"


def _losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"train step\s+(\d+)\s+loss ([\d.]+)", log)}


def resume_after_a_kill_during_the_step4_save(tmp_path: Path, out: str) -> tuple[dict[int, float], dict[int, float]]:
    """A run (output ``out``) killed while ``iter_4`` was written: ``latest`` still names iter_2 and only a
    metadata-less ``iter_4.partial`` exists; a rerun to step 5 completes, retrains steps 3-5 and writes iter_4
    whole. Returns the losses per step of the killed run and of the rerun."""
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text() == "2", out[-3000:]
    assert not (ckpt / "iter_0000004").exists()
    half = ckpt / "iter_0000004.partial"
    assert half.is_dir() and not (half / "metadata.json").exists()
    resumed = _run([sys.executable, str(DRIVER), str(tmp_path), "trainer.train_steps=5", "trainer.save_every=4",
                    "trainer.log_every=1"])  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"]["step"] == 5 and summary["ended"] == "completed"
    after = _losses(resumed.stdout)
    assert sorted(after) == [3, 4, 5]
    assert (ckpt / "iter_0000004" / "metadata.json").exists() and not list(ckpt.glob("*.partial"))
    return _losses(out), after


def test_run_killed_mid_save_resumes_from_the_previous_checkpoint_and_rewrites_the_half_written_one(
    tmp_path: Path,
) -> None:
    tiny = [str(tmp_path), "trainer.train_steps=100", "trainer.save_every=2", "trainer.log_every=1"]
    proc = _start([sys.executable, str(SLOW_SAVE), "3", "tiny", *tiny])
    out = _signal_group_when(proc, signal.SIGKILL, "saved checkpoint", "train step      4", "checkpoint writer")
    before, after = resume_after_a_kill_during_the_step4_save(tmp_path, out)
    assert [after[3], after[4]] == pytest.approx([before[3], before[4]], abs=1e-4)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "5"


def test_sigterm_during_the_final_save_keeps_the_run_completed(tmp_path: Path) -> None:
    proc = _start([sys.executable, str(SLOW_SAVE), "2", "tiny", str(tmp_path), "trainer.train_steps=3"])
    out = _signal_group_when(proc, signal.SIGTERM, "checkpoint writer")
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ended"] == "completed" and summary["signal"] == 0 and summary["state"]["step"] == 3
    assert "SIGTERM arrived during the final save" in out
    assert (tmp_path / "checkpoints" / "latest").read_text() == "3"

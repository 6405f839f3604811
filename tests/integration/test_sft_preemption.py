"""SIGTERM (Slurm preemption) mid-run: the trainer finishes the step, saves a checkpoint and stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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

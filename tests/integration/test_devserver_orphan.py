"""A dev server started by an RL run dies with the run, however the run dies (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from test_slurm_rl import tiny_hf_policy

ROOT = Path(__file__).resolve().parents[2]


def test_dev_server_exits_when_its_run_is_killed(tmp_path: Path) -> None:
    model = tiny_hf_policy(tmp_path / "hf")
    parent = textwrap.dedent(
        f"""
        import time
        from klong_megatron.rl.servers import DevServerProcess
        p = DevServerProcess({str(model)!r}, threads=1)
        print(p.proc.pid, flush=True)
        time.sleep(600)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(run.stdout.readline())
        assert psutil.pid_exists(child)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.2)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError(f"dev server {child} outlived the SIGKILLed run that started it")
    finally:
        run.kill()

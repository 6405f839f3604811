"""slurm/judge_server.sbatch: starts the server, waits for /health, publishes the URL, stops it on exit.

SGLang needs GPUs, so a test-double ``sglang.launch_server`` module (serving the OpenAI-compatible test
double on the requested port) stands in for it. The script itself runs unchanged, under bash (its
#SBATCH header asks for GPUs, which a CPU-only Slurm node cannot give).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "judge_server.sbatch"

FAKE_LAUNCH = """
# TEST DOUBLE of `python -m sglang.launch_server`: serves the OpenAI-compatible judge double on --port.
import argparse, sys, time
sys.path.insert(0, {here!r})
from openai_judge_double import OpenAIJudgeDouble
ap = argparse.ArgumentParser()
for flag in ("--model-path", "--tp", "--host", "--mem-fraction-static", "--reasoning-parser"):
    ap.add_argument(flag)
ap.add_argument("--port", type=int)
args = ap.parse_args()
time.sleep(1.0)  # a real server is not healthy at once
OpenAIJudgeDouble(port=args.port).start()
while True:
    time.sleep(1)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    pkg = tmp_path / "fake" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "launch_server.py").write_text(FAKE_LAUNCH.format(here=str(Path(__file__).parent)))
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "PYTHON": sys.executable, "JUDGE_PORT": str(port),
            "JUDGE_URL_FILE": str(tmp_path / "judge_url.txt"), "JUDGE_HEALTH_TIMEOUT_S": "60"}  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen | None, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, "the script exited before the server was healthy"
        assert time.monotonic() < deadline, "no URL file"
        time.sleep(0.1)
    return path.read_text().strip()


def test_dry_run_prints_the_server_command(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SCRIPT)], env={**_env(tmp_path, 31234), "DRY_RUN": "1", "JUDGE_TP": "4"},
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "-m sglang.launch_server --model-path openai/gpt-oss-120b --tp 4" in out and "--port 31234" in out
    # reasoning text goes to `reasoning_content`, never into the content the score parser reads
    assert out.split("\n")[0].endswith("--reasoning-parser gpt-oss")
    env = {**_env(tmp_path / "2", 31234), "DRY_RUN": "1", "JUDGE_REASONING_PARSER": "none"}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    assert "--reasoning-parser" not in out


def test_script_waits_for_health_publishes_url_and_stops_server(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=_env(tmp_path, port), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        url = _wait_for(tmp_path / "judge_url.txt", proc)
        assert url.endswith(f":{port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert not (tmp_path / "judge_url.txt").exists()  # the exit trap cleaned up
    time.sleep(0.5)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)

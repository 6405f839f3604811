"""The reproduction step (klong_megatron/eval/reproduce.py) on both sandbox backends: a clean copy without
venv/.venv, the REAL reproduce.log (an agent-written one is replaced), exit code, timeout, missing script,
log creation time vs. modification times (PaperBench's Result Analysis rule), and the agent's dir untouched."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.eval.reproduce import reproduce
from klong_megatron.judge.submission import REPRODUCE_LOG, REPRODUCE_META

BACKENDS = [pytest.param("bwrap", marks=pytest.mark.bwrap), pytest.param("docker", marks=pytest.mark.docker)]


def _cfg(backend: str, timeout_s: float = 30) -> ReproduceConfig:
    return ReproduceConfig(timeout_s=timeout_s, sandbox=SandboxConfig(backend=backend, memory_mb=1024))


def _submission(tmp_path: Path, script: str | None) -> Path:
    sub = tmp_path / "submission"
    (sub / "venv" / "bin").mkdir(parents=True)
    (sub / "venv" / "bin" / "python").write_text("agent's venv")
    (sub / ".venv").mkdir()
    (sub / "code.py").write_text("print('hi')\n")
    (sub / "future.csv").write_text("claimed,result\n")
    os.utime(sub / "future.csv", (time.time() + 86400, time.time() + 86400))  # dated into the future by the agent
    (sub / REPRODUCE_LOG).write_text("FAKE: all results reproduced\n")
    (sub / REPRODUCE_META).write_text('{"exit_code": 0}')
    if script is not None:
        (sub / "reproduce.sh").write_text(script)
    return sub


@pytest.mark.parametrize("backend", BACKENDS)
def test_run_is_recorded_from_a_clean_copy(tmp_path, backend):
    script = "ls -a; mkdir -p out && python3 code.py > out/result.txt; echo done-running; exit 3\n"
    sub = _submission(tmp_path, script)
    before = {p: p.stat().st_mtime for p in sub.rglob("*")}
    meta = reproduce(sub, tmp_path / "executed", _cfg(backend))
    done = tmp_path / "executed"
    log = (done / REPRODUCE_LOG).read_text()
    assert "FAKE" not in log and "done-running" in log and "exited with code 3" in log
    assert "venv" not in log.split("done-running")[0]  # ls -a in the run: no venv/.venv copied
    assert not (done / "venv").exists() and not (done / ".venv").exists()
    assert meta.exit_code == 3 and not meta.timed_out and not meta.missing_script
    assert json.loads((done / REPRODUCE_META).read_text()) == meta.to_dict()
    assert meta.log_created_at == int(meta.log_created_at) and abs(meta.log_created_at - time.time()) < 60
    assert (done / "out" / "result.txt").stat().st_mtime >= meta.log_created_at  # written by the run
    assert (done / "code.py").stat().st_mtime < meta.log_created_at  # uploaded before it
    assert (done / "future.csv").stat().st_mtime < meta.log_created_at  # clamped at upload
    assert {p: p.stat().st_mtime for p in sub.rglob("*")} == before and (sub / REPRODUCE_LOG).read_text().startswith(
        "FAKE"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_is_recorded_and_output_kept(tmp_path, backend):
    sub = _submission(tmp_path, "echo started; sleep 60\n")
    meta = reproduce(sub, tmp_path / "executed", _cfg(backend, timeout_s=3))
    log = (tmp_path / "executed" / REPRODUCE_LOG).read_text()
    assert meta.timed_out and meta.exit_code is None and 2.5 < meta.duration_s < 20
    assert "started" in log and "timed out" in log


@pytest.mark.bwrap
def test_missing_script_is_recorded_without_running(tmp_path):
    sub = _submission(tmp_path, None)
    meta = reproduce(sub, tmp_path / "executed", _cfg("bwrap"))
    assert meta.missing_script and meta.exit_code is None and meta.duration_s == 0.0
    log = (tmp_path / "executed" / REPRODUCE_LOG).read_text()
    assert "not found" in log and "FAKE" not in log
    assert (tmp_path / "executed" / "code.py").exists() and not (tmp_path / "executed" / "venv").exists()

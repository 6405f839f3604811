"""The whole GPU validation (tools/gpu_check.sh) passes on a CUDA device; skipped where there is none."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu


def test_every_gpu_check_passes_or_is_skipped_with_a_reason(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    report = json.loads(out.read_text())
    failed = {k: v.get("error", v) for k, v in report["checks"].items() if v["status"] == "fail"}
    assert not failed and proc.returncode == 0, json.dumps(failed, indent=1)[-4000:]

"""tools/gpu_check.sh writes its JSON report; a check whose requirement is missing is skipped with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_reports_versions_and_skips_what_is_missing_with_the_reason(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--out", str(out), "--only", "versions", "te_thd_vs_mask",
           "logprobs_32k"]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    )
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["versions"]["status"] == "pass" and checks["versions"]["torch"] == torch.__version__
    assert checks["versions"]["megatron-core"] == "0.16.1"
    if not torch.cuda.is_available():
        assert checks["logprobs_32k"] == {"status": "skipped", "reason": checks["logprobs_32k"]["reason"]}
        assert "no CUDA device" in checks["logprobs_32k"]["reason"]
        assert checks["te_thd_vs_mask"]["status"] == "skipped"
        assert proc.returncode == 0 and report["ok"], proc.stdout + proc.stderr


def test_gpu_only_paths_each_have_a_check_and_cp_needs_two_gpus(monkeypatch) -> None:
    """TE, bf16, THD + CP, MoE grouped GEMM and the RL loss each have a check; CP 2 is skipped on one GPU."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    for name in ("te_thd_vs_mask", "sft_te_bf16", "thd_cp2", "moe_grouped_gemm", "rl_loss_te_thd", "distopt_resume"):
        assert name in gpu_check.CHECKS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpu_check.missing(("cuda", "te", "2gpus")) == "needs 2 GPUs (CP 2 over NCCL), found 1"

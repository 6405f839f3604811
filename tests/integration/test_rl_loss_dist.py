"""Multi-rank RL loss under torchrun (2 processes, gloo): TP=2 vocab-parallel log-probs, DP=2 global
token normalisation, PP=2 stages (the checks themselves are in rl_loss_dist_worker.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("rl_loss_dist_worker.py")


def test_tp2_vocab_parallel_dp2_token_normalisation_and_pp2_stages_match_the_reference() -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    for phase in ("TP OK", "DP OK", "PP OK"):
        # both ranks report each phase; their lines may interleave in the shared stdout
        assert all(f"rank {r}: {phase}" in out.stdout for r in (0, 1)), log[-6000:]

"""``klong-rl`` with the collapse / stall detector on a forced collapse: a policy whose every rollout scores
0 (what the issue's lr=2e-3 run became after one update), so every group is zero-variance and filtered and
nothing trains. ``rl.health.action=rollback`` rolls back to the best checkpoint with half the learning rate
and discards the rollouts of the collapsed policy; when it trips again with its rollbacks used up the run
stops with exit status 3 and the reason on stderr, leaving no process behind.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_rl_trainer import _start, _state

pytestmark = pytest.mark.bwrap

HEALTH = (
    "algo.filter_zero_variance=true",
    "rl.health.action=rollback",
    "rl.health.stall_iterations=1",
    "rl.health.max_rollbacks=1",
)


def test_forced_collapse_rolls_back_with_lower_lr_then_stops(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, *HEALTH)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, log[-6000:]
    assert "Rolled back to the best checkpoint (initial) as policy version 2; learning rate now 0.0001" in log, log[
        -6000:
    ]
    assert "klong-rl: RL stopped after 1 rollback(s) at stage 0 iteration 1: stall: no trainable group" in log
    state = _state(out)
    assert state["health"]["rollbacks"] == 1 and state["version"] == 3 and state["iteration"] == 2
    assert state["best"]["label"] == "initial" and (out / "checkpoints_best" / "latest").exists()
    # The rollouts iteration 1 had started under the collapsed policy were discarded and re-run after the rollback.
    iter1 = [json.loads(x) for x in (out / "rollouts" / "stage0_iter0001.jsonl").read_text().splitlines()]
    assert {s["weight_version"] for t in iter1 for s in t["meta"]["steps"]} == {"2"}
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes of the stopped run still running: {leftovers}"

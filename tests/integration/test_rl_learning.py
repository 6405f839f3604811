"""RL learns, and learns in the right direction: a tiny model on a task whose reward it can learn in a few
iterations (``rl_learning.py``: first tool call ``pick(colour="blue")``), through the real rollout -> windows
-> packed rows -> Megatron loss -> optimizer path. At the default objective the training reward rises; with
every reward negated (same seed, so the same first rollouts) it falls. A sign error, an advantage attached
to the wrong window or a log-prob shifted against its token breaks one of the two.

Both runs are separate processes (Megatron's global state), started together: ~1 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(HERE / "rl_learning.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def test_training_reward_rises_and_falls_with_the_advantage_sign_flipped() -> None:
    learn, flipped = _start("--sign", "1"), _start("--sign", "-1")
    up, down = _result(learn)["rewards"], _result(flipped)["rewards"]
    assert up[0] == down[0], (up, down)  # same seed: the same first rollouts, before any RL update
    assert 0.05 <= up[0] <= 0.6, up  # the warm-up left room both ways
    late_up, late_down = sum(up[-3:]) / 3, sum(down[-3:]) / 3
    assert late_up >= up[0] + 0.3 and late_up >= 0.6, f"reward did not rise: {up}"
    assert late_down <= up[0] - 0.1 and late_down <= 0.1, f"reward did not fall with the sign flipped: {down}"

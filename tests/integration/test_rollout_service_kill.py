"""SIGKILL of a rollout service process under concurrent load (benchmarks/rollout_service_load.py's check).

The service runs 48 rollouts (12 groups of 4, 16 at a time, 4 turns each, zero-latency engine, in-memory
sandbox double) in a child process that is SIGKILLed once a third of them are stored, then restarted on the
same directory. Every rollout must be stored exactly once, every group logged once, complete, with offsets
pointing at its own records. (test_rl_rollout_service.py kills the service under the real trainer.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rollout_service_load.py"


def _load_benchmark():
    sys.path.insert(0, str(_PATH.parent))
    spec = importlib.util.spec_from_file_location("rollout_service_load", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rollout_service_load"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sigkill_of_the_service_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    bench = _load_benchmark()
    res = bench.kill_check(concurrency=16, groups=12, group_size=4, turns=4, out=tmp_path)
    assert 48 // 3 <= res["stored_before_kill"] < 48, res  # killed mid-run
    assert res["stored"] == 48 and res["groups_logged"] == 12, res
    assert res["lost"] == res["duplicated"] == res["incomplete_groups"] == res["bad_offsets"] == 0, res

"""Distributed-optimizer checkpoints reshard across tensor parallelism; RNG keys are unique with CP.

A run at TP=2 (torchrun, gloo) with the distributed optimizer stops after 2 steps; a single process at
TP=1 with the distributed optimizer resumes it and its steps 3-4 equal an uninterrupted TP=1 run's
(``fully_reshardable`` format; megatron-core 0.16.1 ``DistributedOptimizer.sharded_state_dict``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

DRIVER = Path(__file__).resolve().parent / "sft_driver.py"
COMMON = ["trainer.train_steps=4", "trainer.parallel.use_distributed_optimizer=true", "trainer.lr=3e-3"]


def _run(out: Path, nproc: int, overrides: list[str]) -> list[float]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(DRIVER), str(out), *COMMON, *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())["losses"]


def test_tp2_distributed_optimizer_checkpoint_resumes_at_tp1(tmp_path: Path) -> None:
    reference = _run(tmp_path / "tp1", 1, [])
    save = f"trainer.save_dir={tmp_path / 'ckpt'}"
    first = _run(tmp_path / "tp2", 2, ["trainer.parallel.tp=2", "trainer.exit_after_steps=2", save])
    meta = dist_checkpointing.load_content_metadata(str(tmp_path / "ckpt" / "iter_0000002"))
    assert meta["distrib_optim_sharding_type"] == "fully_reshardable"
    resumed = _run(tmp_path / "tp1-resumed", 1, [save])
    assert len(first) == 2 and len(resumed) == 2
    assert first + resumed == pytest.approx(reference, abs=2e-5)


def test_rng_state_is_one_object_per_pp_tp_rank_replicated_over_dp_and_cp(monkeypatch) -> None:
    """CP ranks of one (PP, TP) position hold the same RNG key: only one of them may be the main replica."""
    from megatron.core import parallel_state

    from klong_megatron.megatron import checkpoint

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 1)
    replicas = []
    for dp_rank in range(2):
        for cp_rank in range(2):  # Megatron's DP x CP rank: dp_rank * cp + cp_rank
            monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda with_context_parallel=False, d=dp_rank,
                                c=cp_rank: d * 2 + c if with_context_parallel else d)  # fmt: skip
            obj = checkpoint._sharded_rng({"seed": 1})
            assert obj.key == "rng_state" and obj.global_offset == (0, 0)
            replicas.append(obj.replica_id)
    assert sorted(replicas) == [0, 1, 2, 3]  # exactly one main replica (0) among the 4 DP x CP ranks

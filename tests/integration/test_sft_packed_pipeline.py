"""The flat packed layout of the GPU path ([1, mbs*S] per micro-batch, Transformer Engine's THD shape) trains
like [mbs, S] rows, also through a 2-stage pipeline with micro-batch 2 (pipeline buffers (mbs*S, 1, H)).

Without Transformer Engine the flat sequence runs through the local spec under a [1,1,T,T] block mask
(``trainer.packed_format=thd``), so the pipeline shapes of the GPU path are exercised on CPU (gloo). Also the
GPU default of overlapping the data-parallel gradient reduce with the backward pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parent / "sft_driver.py"
BASE = ["trainer.train_steps=3", "trainer.micro_batch_size=2", "trainer.global_batch_size=4"]


def _run(out: Path, nproc: int, overrides: list[str]) -> list[float]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(DRIVER), str(out), *BASE, *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())["losses"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return _run(tmp_path_factory.mktemp("rows") / "run", 1, [])


def test_flat_packed_micro_batch_2_through_two_pipeline_stages_matches_rows(tmp_path: Path, rows) -> None:
    flat_pp2 = _run(tmp_path / "flat-pp2", 2, ["trainer.packed_format=thd", "trainer.parallel.pp=2"])
    assert len(rows) == len(flat_pp2) == 3
    assert flat_pp2 == pytest.approx(rows, abs=2e-5)


def test_gradient_reduce_overlapped_with_backward_matches(tmp_path: Path, rows) -> None:
    """DP 2 with Megatron DDP's overlapped bucket reduce (the GPU default) trains like one process."""
    dp2 = _run(tmp_path / "dp2-overlap", 2, ["trainer.parallel.overlap_grad_reduce=true"])
    assert dp2 == pytest.approx(rows, abs=2e-5)

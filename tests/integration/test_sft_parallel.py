"""TP=2 and PP=2 under `torchrun --nproc_per_node 2` (gloo) train with the same losses as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parent / "sft_driver.py"
STEPS = ["trainer.train_steps=4"]


def _run(out: Path, nproc: int, overrides: list[str]) -> list[float]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           str(DRIVER), str(out), *STEPS, *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())["losses"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return _run(tmp_path_factory.mktemp("tp1") / "run", 1, [])


@pytest.mark.parametrize(
    "overrides",
    [["trainer.parallel.tp=2"], ["trainer.parallel.pp=2"], ["trainer.parallel.use_distributed_optimizer=true"]],
    ids=["tp2", "pp2", "dp2-distributed-optimizer"],
)
def test_two_process_layouts_match_one_process(tmp_path: Path, single_process_losses, overrides) -> None:
    losses = _run(tmp_path / "run", 2, overrides)
    assert len(losses) == len(single_process_losses) == 4
    assert losses == pytest.approx(single_process_losses, abs=2e-5)

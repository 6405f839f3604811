"""Asynchronous and fully parallel checkpoint saves (``trainer.async_save``, ``trainer.fully_parallel_save``).

A DP 2 run (torchrun, gloo) with the distributed optimizer, overlapped gradient reduce and parameter all-gather,
saving in the background with the writes spread over both ranks: each rank writes about half of the bytes, the
saved model weights are the step's (equal to the optimizer's fp32 copy; with ``overlap_param_gather`` they are
gathered only in the next forward unless the save gathers them first), and one process resuming from its step-2
checkpoint repeats steps 3-4 exactly. A run
killed (SIGKILL to its process group) while a background save is written, after training went on past that
save's step: ``latest`` still names the previous checkpoint, the half-written one is ``iter_N.partial`` (no
metadata), and the resume starts from the previous checkpoint and reproduces the same losses.
``slow_save_driver.py`` makes every checkpoint writer process pause after writing its shard files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sft_preemption import DRIVER, SLOW_SAVE, _signal_group_when, _start, resume_after_a_kill_during_the_step4_save
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ASYNC = ["trainer.async_save=true", "trainer.fully_parallel_save=true", "trainer.log_every=1"]
DIST_OPT = "trainer.parallel.use_distributed_optimizer=true"
OVERLAP = [DIST_OPT, "trainer.parallel.overlap_param_gather=true", "trainer.parallel.overlap_grad_reduce=true"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_dp2_fully_parallel_async_save_splits_the_writes_and_resumes_exactly(tmp_path: Path) -> None:
    first = tmp_path / "dp2"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(DRIVER),
          str(first), "trainer.train_steps=4", "trainer.save_every=2", *ASYNC, *OVERLAP])  # fmt: skip
    losses = json.loads((first / "summary.json").read_text())["losses"]
    step2 = first / "checkpoints" / "iter_0000002"
    assert (first / "checkpoints" / "latest").read_text() == "4" and (step2 / "metadata.json").exists()
    sizes = {rank: sum(f.stat().st_size for f in step2.glob(f"__{rank}_*.distcp")) for rank in (0, 1)}
    assert 0.35 < sizes[1] / (sizes[0] + sizes[1]) < 0.65, sizes  # without it DP rank 0 writes everything
    dcp_to_torch_save(step2, tmp_path / "step2.pt")
    saved = torch.load(tmp_path / "step2.pt", weights_only=False)
    pairs = [(k, "optimizer.state.param." + k) for k in saved if "optimizer.state.param." + k in saved]
    assert len(pairs) >= 9
    for model_key, main_key in pairs:  # fp32: the model's weights are the optimizer's main params after a step
        torch.testing.assert_close(saved[model_key], saved[main_key], rtol=0, atol=0, msg=model_key)

    resumed = tmp_path / "resumed"
    _run([sys.executable, str(DRIVER), str(resumed), "trainer.train_steps=4", f"trainer.resume_from={step2}",
          f"trainer.save_dir={resumed / 'checkpoints'}", DIST_OPT])  # fmt: skip
    assert json.loads((resumed / "summary.json").read_text())["losses"] == pytest.approx(losses[2:], abs=2e-5)


def test_run_killed_during_a_background_save_resumes_from_the_last_complete_checkpoint(tmp_path: Path) -> None:
    tiny = [str(tmp_path), "trainer.train_steps=100", "trainer.save_every=2", *ASYNC]
    proc = _start([sys.executable, str(SLOW_SAVE), "6", "tiny", *tiny])
    # iter_2 published when the step-4 save starts (one in flight); step 5 trains while iter_4 is written
    out = _signal_group_when(proc, signal.SIGKILL, "saved checkpoint", "writing checkpoint", "train step      5")
    ckpt = tmp_path / "checkpoints"
    step2, step4 = ckpt / "iter_0000002", ckpt / "iter_0000004"
    # steps 3 and 4 trained while iter_2 was being written (a synchronous save publishes it before step 3)
    started, published = out.index(f"writing checkpoint {step2}"), out.index(f"saved checkpoint {step2}")
    assert started < out.index("train step      3") < out.index("train step      4") < published
    assert f"saved checkpoint {step4}" not in out, out[-3000:]
    before, after = resume_after_a_kill_during_the_step4_save(tmp_path, out)
    assert [after[3], after[4], after[5]] == pytest.approx([before[3], before[4], before[5]], abs=1e-4)

"""The Megatron-Core SFT trainer on CPU/gloo, one process: resume, loss normalisation, bad input, W&B."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sft_driver import tiny_config
from sft_tiny_data import tiny_data
from wandb_records import read_run

from klong_megatron.logging import MetricsLogger, run_id
from klong_megatron.megatron.parallel import destroy_distributed
from klong_megatron.sft.trainer import NonFiniteLossError, SFTTrainer


def _train(tmp: Path, overrides: list[str], data: dict | None = None, logger=None) -> dict:
    cfg = tiny_config(overrides)
    try:
        return SFTTrainer(cfg, tmp, data=data or tiny_data()).run(logger)
    finally:
        destroy_distributed()


def test_exit_and_resume_ends_with_the_same_loss_as_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["trainer.train_steps=8", "model.hidden_dropout=0.1"]  # dropout: the RNG state must be restored
    full = _train(tmp_path / "full", common)
    first = _train(tmp_path / "split", [*common, "trainer.exit_after_steps=4"])
    assert first["state"] == {"step": 4, "consumed_samples": 16}
    assert first["ended"] == "exit_after_steps=4"
    second = _train(tmp_path / "split", common)
    assert second["state"] == full["state"]
    assert len(second["losses"]) == 4
    assert second["losses"] == pytest.approx(full["losses"][4:], abs=1e-6)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "8"


def test_loss_is_the_mean_over_trained_tokens_however_micro_batches_split(tmp_path: Path) -> None:
    a = _train(tmp_path / "a", ["trainer.train_steps=3", "trainer.micro_batch_size=1"])
    b = _train(tmp_path / "b", ["trainer.train_steps=3", "trainer.micro_batch_size=4"])
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    assert a["metrics"]["trained_tokens"] == b["metrics"]["trained_tokens"]
    assert a["metrics"]["grad_norm"] == pytest.approx(b["metrics"]["grad_norm"], rel=1e-4)


def test_learning_rate_warms_up_then_decays_to_min_lr(tmp_path: Path) -> None:
    out = _train(tmp_path, ["trainer.train_steps=6", "trainer.warmup_steps=2", "trainer.min_lr=1e-4",
                            "trainer.lr=1e-3", "trainer.eval_every=3"])  # fmt: skip
    assert out["metrics"]["lr"] == pytest.approx(1e-4)
    assert math.isfinite(out["metrics"]["eval_loss"])


def test_nan_loss_stops_the_run_naming_step_and_trajectory_ids(tmp_path: Path) -> None:
    data = tiny_data(n_train=4, poison=2)
    with pytest.raises(NonFiniteLossError, match=r"step 1.*traj-2-a"):
        _train(tmp_path, [], data=data)


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resume_from"):
        _train(tmp_path, [f"trainer.resume_from={tmp_path / 'nope'}"])


def test_tokenizer_larger_than_the_model_vocab_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.vocab_size"):
        _train(tmp_path, ["model.vocab_size=32"])


def test_wandb_run_is_resumed_with_the_same_id_and_continuing_steps(tmp_path: Path) -> None:
    """A stopped and resumed job (same output directory) writes to ONE W&B run; steps continue."""
    runs = []
    for extra in (["trainer.exit_after_steps=2"], []):
        cfg = tiny_config(["logger.backend=wandb", "logger.mode=offline"])
        logger = MetricsLogger(cfg.logger, enabled=True, run_dir=tmp_path, config={"lr": 3e-3}, default_name="t")
        _train(tmp_path, ["trainer.train_steps=4", "trainer.log_every=1", *extra], logger=logger)
        runs.append(logger.wandb_run_dir)
        logger.finish()
    first, second = (read_run(d, wait_for_step=s) for d, s in zip(runs, (2, 4), strict=True))
    assert first[0] == second[0] == (tmp_path / "wandb_run_id").read_text().strip()
    assert first[1] == [1, 2] and second[1] == [3, 4]
    blob = b"".join(p.read_bytes() for p in runs[1].glob("*.wandb"))
    for key in (b"train/loss", b"train/tokens_per_s", b"train/grad_norm", b"git_commit"):
        assert key in blob, key


def test_each_output_directory_has_its_own_wandb_run_id(tmp_path: Path) -> None:
    """Hydra multirun jobs each have an output directory, so each job is its own W&B run."""
    ids = [run_id(tmp_path / f"job{i}") for i in range(2)]
    assert ids[0] != ids[1] and run_id(tmp_path / "job0") == ids[0]

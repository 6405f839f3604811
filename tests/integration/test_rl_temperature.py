"""Per-rollout sampling temperatures: a rollout sampled at T = 0.7 by a server with SGLang's log-prob
semantics (``log_softmax(logits / T)``, the dev server) is scored by the RL policy at 0.7, whatever
``algo.temperature`` says: at the first update the old log-probs equal the rollout's (TIS weight 1) and
the PPO ratio is 1 (no bias). Scored at 1.0 instead, the same tokens get a clearly different log-prob.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.data.render import load_tokenizer
from klong_megatron.megatron.parallel import destroy_distributed
from klong_megatron.rl.policy import Policy, with_temperatures
from klong_megatron.rl.windows import RLWindow, pack_rows
from klong_megatron.rollout.devmodel import DevModel, HFCausalLM
from klong_megatron.rollout.engine import SamplingParams

pytestmark = pytest.mark.usefixtures("hydra_configs")
PROMPT = [5, 17, 300, 42, 7, 99, 123, 8]
SEQ = 64


@pytest.fixture
def policy(tmp_path):
    overrides = ["experiment=rl_demo", "rl.sft_warmup=null", "trainer.global_batch_size=1",
                 "trainer.micro_batch_size=1", "algo.temperature=1.0", f"output_dir={tmp_path}"]  # fmt: skip
    cfg = OmegaConf.to_object(compose(config_name="rl", overrides=overrides))
    assert cfg.rollout.sampling.temperature == 0.7 and cfg.algo.temperature == 1.0  # no longer refused
    pol = Policy(cfg)
    with torch.no_grad():  # a peaked distribution: temperature changes log-probs a lot (a random init is flat)
        for p in pol.model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    pol.optimizer.reload_model_params()
    yield pol
    destroy_distributed()


def _sampled_row(policy: Policy, tmp_path, temperature: float) -> dict:
    """A rollout of the exported policy on the dev model at ``temperature``, packed as the trainer does."""
    hf = policy.export_hf(tmp_path / "hf", load_tokenizer(policy.cfg.data.tokenizer))
    gen = DevModel(HFCausalLM.from_dir(hf)).generate(PROMPT, SamplingParams(max_new_tokens=24, temperature=temperature))
    n, out = len(PROMPT), list(gen.output_ids)
    ids = np.asarray(PROMPT + out, np.int32)
    mask = np.r_[np.zeros(n), np.ones(len(out))].astype(np.uint8)
    lp = np.r_[np.full(n, np.nan), gen.output_logprobs].astype(np.float32)
    temps = np.r_[np.full(n, np.nan), np.full(len(out), temperature)].astype(np.float32)
    (row,) = pack_rows([RLWindow("r0", "g0", ids, mask, lp, 1.0, 0, temps)], SEQ, 0)
    return row


def test_rollout_at_0_7_gets_ratio_1_and_tis_weight_1_at_the_first_update(policy, tmp_path) -> None:
    row = _sampled_row(policy, tmp_path, 0.7)
    trained = row["loss_mask"].astype(bool)
    assert trained.sum() >= 8 and np.allclose(row["temperatures"][trained], 0.7)
    (old,) = policy.logprobs([with_temperatures(row, 1.0)])  # the row's own 0.7 wins over the default
    np.testing.assert_allclose(old[trained], row["rollout_logprobs"][trained], atol=2e-4)
    at_one = dict(row, temperatures=np.ones_like(row["temperatures"]))  # what scoring at algo.temperature gave
    (biased,) = policy.logprobs([at_one])
    assert np.abs(biased[trained] - row["rollout_logprobs"][trained]).mean() > 0.05
    metrics = policy.update([row])
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert np.isfinite(metrics["pg_loss"])


def test_unknown_temperatures_fall_back_to_the_sampling_temperature() -> None:
    row = {"tokens": np.zeros(4, np.int32), "temperatures": np.array([np.nan, 0.3, np.nan, 1.5], np.float32)}
    np.testing.assert_allclose(with_temperatures(row, 0.7)["temperatures"], [0.7, 0.3, 0.7, 1.5], rtol=1e-6)
    assert with_temperatures({"tokens": np.zeros(3)}, 0.0)["temperatures"].tolist() == [1.0] * 3  # greedy: 1.0

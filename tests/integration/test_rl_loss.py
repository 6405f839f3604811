"""RL loss on a tiny Megatron GPT on CPU: hidden-state log-probs equal the model's logits, gradients
equal the full-logits reference, and one RL update moves log-probs along the advantages.

Multi-rank behaviour (TP=2 vocab-parallel log-probs, DP=2 global token normalisation) is in
``test_rl_loss_dist.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from rl_tiny import MODEL, SEQ, logits_of, reference_loss, rl_batch

from klong_megatron.config.grpo import GRPOConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed, set_seed
from klong_megatron.megatron.rl_loss import make_logprob_forward_step, make_rl_forward_step, reduce_rl_reports


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _model(seed: int = 7, *, tied: bool = False, bf16: bool = False):
    set_seed(seed)
    model = build_gpt(dataclasses.replace(MODEL, untie_embeddings=not tied), bf16=bf16)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    return Float16Module(model.config, model) if bf16 else model


def _logprobs(model, batches: list[dict], chunk_size: int = 5) -> list[torch.Tensor]:
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=make_logprob_forward_step(chunk_size=chunk_size),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True,
        )
    return [o["logprobs"] for o in out]


@pytest.mark.parametrize(("tied", "bf16", "tol"), [(False, False, 1e-5), (True, False, 1e-5), (False, True, 2e-2)])
def test_logprobs_from_hidden_states_equal_log_softmax_of_the_model_logits(tied, bf16, tol) -> None:
    model = _model(tied=tied, bf16=bf16)
    batch = rl_batch(3, seed=0)
    (got,) = _logprobs(model, [batch])
    with torch.no_grad():
        want = torch.log_softmax(logits_of(model, batch), -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    assert got.shape == (3, SEQ) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("tied", [False, True])
def test_rl_loss_gradients_equal_the_full_logits_reference(tied) -> None:
    model = _model(tied=tied)
    batch = rl_batch(4, seed=1)
    (current,) = _logprobs(model, [batch])
    g = torch.Generator().manual_seed(3)
    batch["old_logprobs"] = current + 0.3 * torch.randn(current.shape, generator=g)  # some ratios get clipped
    batch["ref_logprobs"] = current + 0.1 * torch.randn(current.shape, generator=g)
    batch["rollout_logprobs"] = batch["old_logprobs"] + 0.5 * torch.randn(current.shape, generator=g)
    algo = GRPOConfig(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.1, entropy_coef=0.01, tis_cap=1.5)

    hidden, loss_func = make_rl_forward_step(algo)(iter([batch]), model)
    loss_sum, num_tokens, report = loss_func(hidden)
    (loss_sum / num_tokens).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    kw = {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 3.0, "kl_coef": 0.1, "entropy_coef": 0.01, "tis_cap": 1.5}
    kw |= {"ref_logprobs": batch["ref_logprobs"], "rollout_logprobs": batch["rollout_logprobs"]}
    reference_loss(logits_of(model, batch), batch, num_tokens=float(num_tokens), **kw).backward()

    assert int(num_tokens) == int(batch["loss_mask"].sum())
    assert 0.0 < report["clip_frac"][0].item() < report["clip_frac"][1].item()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_one_rl_update_raises_logprobs_of_positive_advantage_windows() -> None:
    model = _model()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=1.0), [ddp])
    batches = [rl_batch(2, seed=10), rl_batch(2, seed=11, trained_from=6)]  # advantages +1, -1 in each
    before = _logprobs(ddp, batches)
    for b, lp in zip(batches, before, strict=True):
        b["old_logprobs"] = b["rollout_logprobs"] = lp

    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=make_rl_forward_step(GRPOConfig()),
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    after = _logprobs(ddp, batches)

    metrics = reduce_rl_reports(reports)
    assert ok and grad_norm > 0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and metrics["clip_frac"] == 0.0
    assert metrics["tis_weight_mean"] == pytest.approx(1.0)
    for b, lp0, lp1 in zip(batches, before, after, strict=True):
        m = b["loss_mask"]
        delta = ((lp1 - lp0) * m).sum(-1) / m.sum(-1)  # mean change per window
        assert delta[0] > 0 > delta[1], delta  # window 0 has advantage +1, window 1 has -1


def test_rl_forward_step_requires_per_token_loss_normalisation() -> None:
    model = _model()
    model.config.calculate_per_token_loss = False
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        make_rl_forward_step(GRPOConfig())(iter([rl_batch(1, seed=0)]), model)


def test_missing_batch_field_is_named() -> None:
    model = _model()
    batch = rl_batch(1, seed=0)
    hidden, loss_func = make_rl_forward_step(GRPOConfig())(iter([batch]), model)
    with pytest.raises(ValueError, match="old_logprobs"):
        loss_func(hidden)

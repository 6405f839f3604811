"""The RL loss on packed THD batches under context parallelism equals the CP 1 result (CPU, one process).

CP attention needs Transformer Engine on a GPU, so the CP ranks are simulated where their attention output is
known exactly: every window is padded to a multiple of 2*CP at its end (causal: the real tokens' hidden states
do not change), the model runs once over the padded flat sequence under a block mask, and CP rank r gets the
hidden states of the tokens ``thd_partition_indices`` gives it (what TE's CP attention returns for them,
megatron-core 0.16.1 ``get_thd_batch_on_this_cp_rank``). From there the real code runs per rank: the batch
partition of every per-token RL tensor (``rl.policy.thd_rl_micro_batch``), the loss sum and local token count
(``rl_loss_func``), the per-rank log-probs and their reassembly (``gather_thd_tokens`` / ``thd_unpartition``).
Summed over CP ranks (what ``finalize_model_grads`` does over the DP x CP group) loss, token count, metrics and
gradients equal the CP 1 run, and the flat CP 1 layout equals the row layout with per-row block masks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.distributed import finalize_model_grads
from rl_tiny import MODEL, SEQ, VOCAB

from klong_megatron.config.grpo import GRPOConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.dataset import block_causal_mask
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed, set_seed
from klong_megatron.megatron.rl_loss import (
    _forward_hidden,
    _logprob_report,
    make_logprob_forward_step,
    make_rl_forward_step,
    reduce_rl_reports,
    rl_loss_func,
    unwrap_gpt,
)
from klong_megatron.rl.policy import RL_TOKEN_KEYS, gather_thd_tokens, thd_rl_micro_batch
from klong_megatron.sft.batches import pad_thd, thd_partition_indices, thd_unpartition

ALGO = GRPOConfig(clip_low=0.2, clip_high=0.28, clip_c=3.0, kl_coef=0.1, entropy_coef=0.01, tis_cap=1.5)
ROW_CUTS = ([5, 11], [7])  # window boundaries inside each packed row of SEQ tokens (odd lengths: CP pads them)


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def _model():
    set_seed(11)
    model = build_gpt(MODEL)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    return model


def _thd_batch(seed: int) -> dict:
    """A collated THD RL micro-batch of 2 packed rows (as ``rl.policy._to_batch`` gives, before CP layout)."""
    g = torch.Generator().manual_seed(seed)
    rows = len(ROW_CUTS)
    seq = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    cus, positions = [0], []
    for b, cuts in enumerate(ROW_CUTS):
        bounds = [0, *cuts, SEQ]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            cus.append(b * SEQ + hi)
            positions.append(torch.arange(hi - lo))
    cu = torch.tensor(cus, dtype=torch.int32)
    old = -3.0 - torch.rand(rows, SEQ, generator=g)
    return {
        "tokens": seq[:, :-1],
        "labels": seq[:, 1:],
        "position_ids": torch.cat(positions).reshape(rows, SEQ),
        "loss_mask": (torch.rand(rows, SEQ, generator=g) > 0.25).float(),
        "advantages": torch.randn(rows, SEQ, generator=g),  # per token: packed rows hold several windows
        "old_logprobs": old,
        "ref_logprobs": old + 0.1 * torch.randn(rows, SEQ, generator=g),
        "rollout_logprobs": old + 0.3 * torch.randn(rows, SEQ, generator=g),
        "temperatures": 0.6 + 0.8 * torch.rand(rows, SEQ, generator=g),  # each token's sampling temperature
        "cu_seqlens": cu,
        "max_seqlen": int(torch.diff(cu).max()),
        "trajectory_ids": [["t0"], ["t1"]],
    }


def _cp1(model, batch: dict):
    """CP 1 through the real forward steps (flat THD layout, block mask): loss, count, report, grads, logprobs."""
    mb = thd_rl_micro_batch(batch, 1, 0, block_mask=True)
    hidden, loss_func = make_rl_forward_step(ALGO)(iter([mb]), model)
    loss_sum, n, report = loss_func(hidden)
    model.zero_grad()
    (loss_sum / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        hidden, report_func = make_logprob_forward_step(chunk_size=7)(iter([mb]), model)
        logprobs = gather_thd_tokens(report_func(hidden)[2]["logprobs"], mb, None)
    return loss_sum.detach(), int(n), report, grads, logprobs.reshape(-1, SEQ)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ranks_together_equal_the_cp1_loss_gradients_and_logprobs(cp: int) -> None:
    model, batch = _model(), _thd_batch(seed=cp)
    want_loss, want_n, want_report, want_grads, want_logprobs = _cp1(model, batch)

    keys = tuple(k for k in RL_TOKEN_KEYS if k in batch)
    full = pad_thd(batch, 2 * cp, keys=keys)
    assert full["tokens"].shape[1] > 2 * SEQ  # CP padding really happened
    full["attention_mask"] = block_causal_mask(full["cu_seqlens_padded"], full["tokens"].shape[1])[None]
    gpt = unwrap_gpt(model)
    model.zero_grad()
    hidden_full, _ = _forward_hidden(model, full)  # [T_padded, 1, H]
    losses, counts, reports, logprob_parts = [], [], [], []
    for rank in range(cp):
        mb = thd_rl_micro_batch(batch, cp, rank)
        assert mb["tokens"].shape == (1, full["tokens"].shape[1] // cp) and "attention_mask" not in mb
        index = thd_partition_indices(mb["cu_seqlens_padded"], full["tokens"].shape[1], cp, rank)
        for key in keys:  # every per-token RL tensor went through the same partition as the tokens
            want = full[key][:, index]
            if key == "temperatures":  # padding tokens at temperature 1 (real ones are > 0)
                want = torch.where(want == 0, torch.ones_like(want), want)
            torch.testing.assert_close(mb[key], want)
        hidden = hidden_full[index]
        loss_sum, n, report = rl_loss_func(mb, gpt, ALGO, hidden)
        losses.append(loss_sum)
        counts.append(int(n))
        reports.append(report)
        logprob_parts.append(_logprob_report(mb, gpt, 7, 1.0, hidden.detach())[2]["logprobs"])
    assert sum(counts) == want_n == int(batch["loss_mask"].sum())
    assert all(0 < c < want_n for c in counts)  # every rank holds part of the trained tokens, none all
    torch.testing.assert_close(sum(losses).detach(), want_loss, rtol=1e-5, atol=1e-6)
    (sum(losses) / sum(counts)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    got_metrics, want_metrics = reduce_rl_reports(reports), reduce_rl_reports([want_report])
    assert got_metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        assert got_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    restored = thd_unpartition(logprob_parts, batch["cu_seqlens"], full["cu_seqlens_padded"]).reshape(-1, SEQ)
    torch.testing.assert_close(restored, want_logprobs, rtol=1e-5, atol=1e-6)


def test_flat_thd_logprobs_equal_the_row_layout() -> None:
    model, batch = _model(), _thd_batch(seed=1)
    *_, flat_logprobs = _cp1(model, batch)
    rows = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")}
    masks = []
    for b in range(len(ROW_CUTS)):  # per-row block masks from the row's own window boundaries
        cu_row = torch.tensor([0, *ROW_CUTS[b], SEQ])
        masks.append(block_causal_mask(cu_row, SEQ))
    rows["attention_mask"] = torch.stack(masks)
    with torch.no_grad():
        hidden, report_func = make_logprob_forward_step(chunk_size=7)(iter([rows]), model)
        row_logprobs = report_func(hidden)[2]["logprobs"]
    torch.testing.assert_close(flat_logprobs, row_logprobs, rtol=1e-5, atol=1e-6)


def test_cp_padding_tokens_carry_no_loss_and_each_token_lands_on_one_rank() -> None:
    batch = _thd_batch(seed=5)
    parts = [thd_rl_micro_batch(batch, 2, r) for r in range(2)]
    assert sum(int(p["loss_mask"].sum()) for p in parts) == int(batch["loss_mask"].sum())
    for key in ("advantages", "old_logprobs", "labels"):
        restored = thd_unpartition([p[key] for p in parts], batch["cu_seqlens"], parts[0]["cu_seqlens_padded"])
        torch.testing.assert_close(restored.reshape(batch[key].shape), batch[key].to(restored.dtype))


def test_rl_with_context_parallelism_refuses_the_local_attention_spec() -> None:
    from klong_megatron.config.data import ContextPolicyConfig, DataConfig
    from klong_megatron.config.rl import RLConfig, StageConfig
    from klong_megatron.config.rollout import RolloutConfig, SamplingConfig
    from klong_megatron.config.trainer import TrainerConfig
    from klong_megatron.rl.policy import Policy

    trainer = TrainerConfig(train_steps=1, global_batch_size=1, parallel=ParallelConfig(cp=2))
    data = DataConfig(tokenizer="demo_bpe", policy=ContextPolicyConfig(max_len=64, gen_reserve=32))
    rollout = RolloutConfig(sampling=SamplingConfig(max_new_tokens=8))
    model = dataclasses.replace(MODEL, seq_length=64)
    cfg = RLConfig(model=model, data=data, trainer=trainer, rollout=rollout, stages=[StageConfig(timeout_s=60.0)])
    with pytest.raises(ValueError, match=r"trainer.parallel.cp=2 needs Transformer Engine's packed \(THD\)"):
        Policy(cfg)

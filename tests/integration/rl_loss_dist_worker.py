"""torchrun worker (2 ranks, gloo) for test_rl_loss_dist.py. Prints "<PHASE> OK" per passed phase.

TP phase (tp=2): vocab-parallel log-probs over a real process group equal the unsharded ones (values,
entropy, gradients), and the RL loss of a TP=2 tiny GPT matches the gathered-full-logits reference.
DP phase (dp=2): ranks hold micro-batches with different trained-token counts; after Megatron's
schedule + finalize_model_grads every rank's gradient equals the single-process gradient of
(sum of per-token losses of ALL micro-batches of both ranks) / (global trained-token count).
PP phase (pp=2): through Megatron's pipeline schedule, every stage's gradients from the hidden-state
RL loss equal those from the model's own output layer (full logits) with the same loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from rl_tiny import MODEL, SEQ, logits_of, reference_loss, rl_batch  # noqa: E402

from klong_megatron.algo.logprobs import token_logprobs, vocab_parallel_token_logprobs  # noqa: E402
from klong_megatron.config.grpo import GRPOConfig  # noqa: E402
from klong_megatron.config.trainer import ParallelConfig  # noqa: E402
from klong_megatron.megatron.model import build_gpt  # noqa: E402
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed, set_seed  # noqa: E402
from klong_megatron.megatron.rl_loss import make_rl_forward_step, tp_all_reduce  # noqa: E402

ALGO = GRPOConfig(clip_c=3.0, kl_coef=0.05, entropy_coef=0.01, tis_cap=2.0, logprob_chunk_size=7)
KW = {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 3.0, "kl_coef": 0.05, "entropy_coef": 0.01, "tis_cap": 2.0}


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"rank {dist.get_rank()} {what}: {m}")


def with_old_logprobs(model: torch.nn.Module, batch: dict, seed: int) -> dict:
    """Attach off-policy old/ref/rollout log-probs (current + noise) so that clipping and TIS act."""
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits_of(model, batch))
        cur = torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    g = torch.Generator().manual_seed(seed)
    batch["old_logprobs"] = cur + 0.3 * torch.randn(cur.shape, generator=g)
    batch["ref_logprobs"] = cur + 0.1 * torch.randn(cur.shape, generator=g)
    batch["rollout_logprobs"] = batch["old_logprobs"] + 0.4 * torch.randn(cur.shape, generator=g)
    return batch


def reference_kw(batch: dict) -> dict:
    return KW | {"ref_logprobs": batch["ref_logprobs"], "rollout_logprobs": batch["rollout_logprobs"]}


def tp_phase() -> None:
    init_distributed(ParallelConfig(tp=2), seed=5)
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    # (a) the bare function over a real process group
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g)
    targets = torch.randint(0, 40, (23,), generator=g)
    g_lp, g_ent = torch.randn(23, generator=g), torch.randn(23, generator=g)
    full_w = weight.clone().requires_grad_()
    lp, ent = token_logprobs(hidden, full_w, targets, chunk_size=5)
    want_gh, want_gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, full_w))
    shard = weight[rank * 20 : (rank + 1) * 20].clone().requires_grad_()
    lp2, ent2 = vocab_parallel_token_logprobs(
        hidden, shard, targets, vocab_start=rank * 20, all_reduce=tp_all_reduce(group), chunk_size=5
    )
    gh, gw = torch.autograd.grad((lp2 * g_lp).sum() + (ent2 * g_ent).sum(), (hidden, shard))
    close(lp2, lp.detach(), "logprobs")
    close(ent2, ent.detach(), "entropy")
    close(gh, want_gh, "grad hidden")
    close(gw, want_gw[rank * 20 : (rank + 1) * 20], "grad weight shard")

    # (b) a TP=2 GPT: RL loss gradients equal the reference built on gathered full logits
    set_seed(5)
    model = build_gpt(MODEL, parallel=ParallelConfig(tp=2))
    model.config.calculate_per_token_loss = True
    batch = with_old_logprobs(model, rl_batch(3, seed=1), seed=2)
    hidden_states, loss_func = make_rl_forward_step(ALGO)(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(hidden_states)
    (loss_sum / num_tokens).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits_of(model, batch))
    reference_loss(logits, batch, num_tokens=float(num_tokens), **reference_kw(batch)).backward()
    for n, p in model.named_parameters():
        close(got[n], p.grad, f"TP grad {n}", tol=1e-4)
    parallel_state.destroy_model_parallel()
    print(f"rank {dist.get_rank()}: TP OK", flush=True)


def dp_phase() -> None:
    init_distributed(ParallelConfig(), seed=9)
    rank = parallel_state.get_data_parallel_rank()
    assert parallel_state.get_data_parallel_world_size() == 2
    set_seed(9)
    model = build_gpt(MODEL)
    reference = build_gpt(MODEL)  # a plain copy (Megatron modules hold process groups: no deepcopy)
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.copy_(p)
    model.config.calculate_per_token_loss = True
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)

    # rank r trains from position 3 + 6r: rank 1 has far fewer tokens, so a per-rank mean would differ
    every = {
        r: [with_old_logprobs(reference, rl_batch(2, seed=10 * r + i, trained_from=3 + 6 * r), seed=i) for i in (1, 2)]
        for r in (0, 1)
    }
    ddp.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=make_rl_forward_step(ALGO),
        data_iterator=iter(every[rank]),
        model=[ddp],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    n_global = sum(float(b["loss_mask"].sum()) for bs in every.values() for b in bs)
    loss = sum(
        reference_loss(logits_of(reference, b), b, num_tokens=n_global, **reference_kw(b))
        for bs in every.values()
        for b in bs
    )
    loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        close(p.main_grad, q.grad, f"DP grad {n}", tol=1e-4)
    parallel_state.destroy_model_parallel()
    print(f"rank {dist.get_rank()}: DP OK", flush=True)


def _reference_step(data_iterator, model):
    """Megatron forward step through the model's own output layer (full logits on the last stage)."""
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"])

    def loss_func(logits):
        loss_sum = reference_loss(logits.float(), b, num_tokens=1.0, **reference_kw(b))
        return loss_sum, b["loss_mask"].sum().to(torch.int), {}

    return out, loss_func


def pp_phase() -> None:
    init_distributed(ParallelConfig(pp=2), seed=13)
    set_seed(13)
    model = build_gpt(MODEL, parallel=ParallelConfig(pp=2))  # this rank's stage
    model.config.calculate_per_token_loss = True
    last = parallel_state.is_pipeline_last_stage()
    batches = [rl_batch(2, seed=20 + i) for i in range(3)]
    g = torch.Generator().manual_seed(4)
    for b in batches:  # old log-probs need not be on-policy here: both paths see the same ones
        b["old_logprobs"] = -3.0 + 0.5 * torch.randn(b["labels"].shape, generator=g)
        b["ref_logprobs"] = b["old_logprobs"] + 0.1 * torch.randn(b["labels"].shape, generator=g)
        b["rollout_logprobs"] = b["old_logprobs"] + 0.4 * torch.randn(b["labels"].shape, generator=g)

    def grads(step) -> dict[str, torch.Tensor]:
        model.zero_grad()
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=SEQ,
            micro_batch_size=2,
            forward_only=False,
        )
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    got, want = grads(make_rl_forward_step(ALGO)), grads(_reference_step)
    assert set(got) == set(want) and (any("output_layer" in n for n in got) == last)
    for n in got:
        close(got[n], want[n], f"PP stage grad {n}", tol=1e-4)
    parallel_state.destroy_model_parallel()
    print(f"rank {dist.get_rank()}: PP OK", flush=True)


if __name__ == "__main__":
    tp_phase()
    dp_phase()
    pp_phase()
    destroy_distributed()

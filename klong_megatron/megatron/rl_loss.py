"""The RL policy loss on Megatron-Core, computed from final hidden states (no [S, V] logits).

Dataflow per micro-batch: RL batch -> GPT forward up to the final norm (output layer skipped) ->
hidden [S, B, H] -> ``vocab_parallel_token_logprobs(hidden, output weight shard, labels)`` -> per-token
log-probs/entropy -> ``policy_loss`` (PPO clip, KL, entropy, TIS) SUMMED over trained tokens ->
``(sum, local trained tokens, report)``. With ``TransformerConfig.calculate_per_token_loss=True`` and
``finalize_model_grads`` (as the SFT trainer sets them), Megatron sums the token counts over all
micro-batches and data-parallel (x context-parallel) ranks and divides the gradients by that global
count: every trained token of the optimizer step weighs 1 / N_global, however windows are spread.

RL batch (dict of tensors, ``[B, S]`` unless said): ``tokens``, ``labels`` (next token ids),
``position_ids``, ``loss_mask`` (1 = trained), ``old_logprobs``, ``advantages`` (``[B]`` per window or
``[B, S]`` per token, which packed rows of several windows need), optional ``ref_logprobs``,
``rollout_logprobs`` and ``temperatures`` (each token's sampling temperature: log-probs are
``log_softmax(logits / T)`` as SGLang reports them; without it ``algo.temperature`` for every token);
attention as in :mod:`klong_megatron.megatron.step`: ``attention_mask``
``[B, 1, S, S]`` (local spec) or ``cu_seqlens``/``max_seqlen`` (TE THD packing).

Context parallelism (THD only): ``rl.policy.thd_rl_micro_batch`` pads every window to a multiple of 2*CP and
keeps this CP rank's tokens of EVERY per-token tensor (old/ref/rollout log-probs and advantages too), as the SFT
batches; the loss here then sums over this rank's tokens only and Megatron's ``finalize_model_grads``
all-reduces the token count over the DP x CP group (megatron-core 0.16.1
``distributed/finalize_model_grads.py``), so no extra CP reduction is needed. Log-probs come back per CP rank
(``[1, T / cp]``); ``rl.policy.gather_thd_tokens`` all-gathers them and restores the original order.

Tensor parallelism: each rank holds a vocab shard of the output weight; the softmax statistics and the
hidden-state gradient are all-reduced over the TP group (``tp_all_reduce``). Sequence parallelism
gathers the hidden states first (GPU only; not exercised by the CPU tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from klong_megatron.algo.grpo import policy_loss
from klong_megatron.algo.logprobs import AllReduce, vocab_parallel_token_logprobs
from klong_megatron.config.grpo import GRPOConfig
from klong_megatron.megatron.step import Batch, moe_padding, packed_seq_params, to_device

REQUIRED_KEYS = ("tokens", "labels", "position_ids", "loss_mask", "old_logprobs", "advantages")
TOKEN_KEYS = (
    "tokens", "labels", "position_ids", "loss_mask", "old_logprobs", "ref_logprobs", "rollout_logprobs", "temperatures",
)  # fmt: skip
METRICS = (
    "pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "ratio_max", "entropy", "ref_kl",
    "tis_weight_mean",
)  # fmt: skip
"""Report names of :func:`rl_loss_func`; the optional ones appear only when their inputs are given."""
_MAX_METRICS = ("ratio_max",)


def tp_all_reduce(group: dist.ProcessGroup | None) -> AllReduce | None:
    """The in-place reduction ``vocab_parallel_token_logprobs`` needs, over ``group`` (None if size 1)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}

    def all_reduce(tensor: Tensor, op: str) -> None:
        dist.all_reduce(tensor, op=ops[op], group=group)

    return all_reduce


def unwrap_gpt(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    inner = model
    while not isinstance(inner, GPTModel):
        if not hasattr(inner, "module"):
            raise TypeError(f"expected a (wrapped) megatron GPTModel, got {type(model).__name__}")
        inner = inner.module
    return inner


def output_weight(gpt: GPTModel) -> Tensor:
    """This rank's ``[V / TP, H]`` output weight (the embedding when they are tied), as the model uses it."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextmanager
def hidden_states_only(gpt: GPTModel):
    """Within the block, ``gpt`` returns final hidden states ``[S, B, H]`` instead of logits or losses."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def _flatten_thd(batch: Batch) -> Batch:
    """Packed THD micro-batch: every ``[B, S]`` tensor becomes ``[1, B * S]``; ``[B]`` advantages per token.

    A batch already laid out for its context-parallel rank (``cu_seqlens_padded``: ``rl.policy.thd_rl_micro_batch``)
    is returned as it is; an unpadded one is refused under context parallelism (every rank would see every token).
    """
    if "cu_seqlens_padded" in batch:
        return batch
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError(
            "a THD RL batch under context parallelism must be padded and split for its CP rank first "
            "(klong_megatron.rl.policy.thd_rl_micro_batch)"
        )
    out = dict(batch)
    if batch["advantages"].dim() == 1:
        out["advantages"] = batch["advantages"].unsqueeze(-1).expand_as(batch["loss_mask"])
    for key in (*TOKEN_KEYS, "advantages"):
        if out.get(key) is not None:
            out[key] = out[key].reshape(1, -1)
    return out


def _forward_hidden(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Batch]:
    missing = [k for k in REQUIRED_KEYS[:3] if k not in batch]
    if missing:
        raise ValueError(f"RL batch lacks {missing} (has {sorted(batch)})")
    gpt = unwrap_gpt(model)
    with hidden_states_only(gpt):
        if "cu_seqlens" in batch:
            batch = _flatten_thd(batch)
            pad = moe_padding(model, batch, batch["tokens"].shape)
            if "attention_mask" in batch:  # the flat layout through the local spec: a [1, 1, T, T] block mask
                hidden = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], **pad)
            else:
                psp = packed_seq_params(batch)
                hidden = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=psp, **pad)
        else:
            pad = moe_padding(model, batch, batch["tokens"].shape)
            hidden = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), **pad)
    return hidden, batch


def token_temperature(batch: Batch, default: float) -> float | Tensor:
    """The batch's per-token ``temperatures`` ``[B, S]`` when it has them, else ``default`` for every token."""
    t = batch.get("temperatures")
    return default if t is None else t.float()


def _logprobs_from_hidden(gpt: GPTModel, hidden: Tensor, labels: Tensor, *, chunk_size: int, temperature):
    """Per-token (logprobs, entropy) ``[B, S]`` float32 from hidden ``[S, B, H]`` and labels ``[B, S]``."""
    if gpt.config.sequence_parallel:  # hidden is this rank's sequence slice; the gradient is reduced below
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    weight = output_weight(gpt)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return vocab_parallel_token_logprobs(
        hidden.transpose(0, 1),
        weight,
        labels,
        vocab_start=tp_rank * weight.shape[0],
        all_reduce=tp_all_reduce(parallel_state.get_tensor_model_parallel_group()),
        chunk_size=chunk_size,
        temperature=temperature,
    )


def rl_loss_func(
    batch: Batch, gpt: GPTModel, algo: GRPOConfig, hidden: Tensor
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Megatron ``loss_func`` for one micro-batch (bind ``batch``, ``gpt``, ``algo`` with partial).

    Returns ``(loss_sum, num_tokens, report)``: the policy loss summed over trained tokens, their count
    (int), and ``report[name] = [sum over tokens, tokens]`` per metric (``[max, 1]`` for ``*_max``),
    which :func:`reduce_rl_reports` turns into step means.
    """
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"RL batch lacks {missing} (has {sorted(batch)})")
    logprobs, entropy = _logprobs_from_hidden(
        gpt, hidden, batch["labels"], chunk_size=algo.logprob_chunk_size,
        temperature=token_temperature(batch, algo.temperature),
    )  # fmt: skip
    mask = batch["loss_mask"].float()
    given = {k: batch[k].float() for k in ("ref_logprobs", "rollout_logprobs") if batch.get(k) is not None}
    loss_sum, metrics = policy_loss(
        logprobs,
        batch["old_logprobs"].float(),
        batch["advantages"].float(),
        mask,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        clip_c=algo.clip_c,
        ref_logprobs=given.get("ref_logprobs"),
        kl_coef=algo.kl_coef,
        kl_estimator=algo.kl_estimator,
        entropy=entropy,
        entropy_coef=algo.entropy_coef,
        num_tokens=1.0,  # a SUM: Megatron divides by the global token count (calculate_per_token_loss)
        rollout_logprobs=given.get("rollout_logprobs"),  # without tis_cap: only the mismatch metric
        tis_cap=algo.tis_cap,
    )
    n = mask.sum()
    report = {"pg_loss": torch.stack([loss_sum.detach(), n])}
    for name, value in metrics.items():
        pair = [value, torch.ones_like(n)] if name in _MAX_METRICS else [value * n, n]
        report[name] = torch.stack(pair).detach()
    return loss_sum, n.to(torch.int), report


def make_rl_forward_step(algo: GRPOConfig) -> Callable:
    """Megatron ``forward_step_func`` for the RL policy update (needs ``calculate_per_token_loss``)."""

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = to_device(next(data_iterator))
        gpt = unwrap_gpt(model)
        if not gpt.config.calculate_per_token_loss:
            raise ValueError(
                "the RL loss needs TransformerConfig.calculate_per_token_loss=True and "
                "finalize_model_grads_func=finalize_model_grads (gradients divided by the global token count)"
            )
        hidden, batch = _forward_hidden(model, batch)
        return hidden, partial(rl_loss_func, batch, gpt, algo)

    return forward_step


def _logprob_report(batch: Batch, gpt: GPTModel, chunk_size: int, temperature: float, hidden: Tensor):
    with torch.no_grad():
        logprobs, entropy = _logprobs_from_hidden(
            gpt, hidden, batch["labels"], chunk_size=chunk_size, temperature=token_temperature(batch, temperature)
        )
    zero = torch.zeros((), device=hidden.device)
    return zero, zero.to(torch.int), {"logprobs": logprobs, "entropy": entropy}


def make_logprob_forward_step(*, chunk_size: int = 1024, temperature: float = 1.0) -> Callable:
    """Forward-only ``forward_step_func``: per-token ``logprobs``/``entropy`` ``[B, S]`` of ``labels``.

    Used to recompute old log-probs with the trainer's weights and reference log-probs with the
    reference model (``get_forward_backward_func()(..., forward_only=True)``); each micro-batch's report
    holds ``{"logprobs", "entropy"}`` (``[1, B * S]`` for THD-packed micro-batches).
    """

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = to_device(next(data_iterator))
        hidden, batch = _forward_hidden(model, batch)
        return hidden, partial(_logprob_report, batch, unwrap_gpt(model), chunk_size, temperature)

    return forward_step


def reduce_rl_reports(reports: list[dict[str, Tensor]], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Step metrics from the micro-batch reports of :func:`rl_loss_func`, reduced over ``group`` (DP).

    Token-weighted means for ``[sum, count]`` metrics, maxima for ``*_max``. Call on every rank of
    ``group`` (it all-reduces); ranks without reports (non-last pipeline stages) pass ``[]``.
    """
    sums = torch.zeros(len(METRICS), 2, dtype=torch.float64)
    for report in reports:
        for k, v in report.items():
            i, v = METRICS.index(k), v.detach().double().cpu()
            sums[i] = torch.maximum(sums[i], v) if k in _MAX_METRICS else sums[i] + v
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        is_max = torch.tensor([k in _MAX_METRICS for k in METRICS])
        summed, maxed = sums.to(device), sums.to(device)
        dist.all_reduce(summed, group=group)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
        sums = torch.where(is_max.unsqueeze(-1), maxed.cpu(), summed.cpu())
    out = {}
    for k, (value, count) in zip(METRICS, sums.tolist(), strict=True):
        if count > 0:
            out[k] = value if k in _MAX_METRICS else value / count
    return out

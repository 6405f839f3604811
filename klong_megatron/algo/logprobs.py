"""Token log-probabilities and entropies without materialising the [T, V] logits.

Dataflow: final hidden states [T, H] + output weight [V, H] + next tokens [T] -> per chunk of rows:
logits [chunk, V] (float32) -> log-sum-exp, target logit, entropy -> logprobs [T], entropy [T].
Backward recomputes each chunk's logits and forms d/dlogits = g_lp (onehot - p) - g_ent p (log p + H),
so peak extra memory is a few [chunk, V] float32 buffers (plus a [V, H] float32 gradient accumulator
when the weight is bf16/fp16) instead of several [T, V] ones. Cost: one extra [T, H] x [H, V] matmul.

Vocab parallelism: ``vocab_parallel_token_logprobs`` takes this rank's weight shard (rows
[vocab_start, vocab_start + V_local)) and an injected in-place ``all_reduce(tensor, op)`` with op in
{"max", "sum"} over the tensor-parallel group; it reduces the row max, the softmax statistics and the
hidden-state gradient. This module itself never imports ``torch.distributed``.

Limits: targets must be valid token ids (no ignore index: mask the loss instead); temperature is
applied to logits before the softmax, as the rollout engine does when sampling: one number, or a tensor
of the targets' shape (each token at the temperature its rollout was sampled with).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor, str], None]
"""In-place reduction over the tensor-parallel group: ``all_reduce(tensor, "max" | "sum")``."""


def _acc_dtype(weight: Tensor) -> torch.dtype:
    """Softmax math runs in float32, or float64 for a float64 weight (gradcheck)."""
    return torch.promote_types(weight.dtype, torch.float32)


Temperature = float | Tensor
"""One temperature, or one per token (the targets' shape)."""


def _chunk_logits(h: Tensor, weight: Tensor, temperature: float | Tensor) -> Tensor:
    logits = torch.mm(h.to(weight.dtype), weight.t()).to(_acc_dtype(weight))
    if isinstance(temperature, Tensor):  # this chunk's per-token temperatures [chunk]
        return logits.div_(temperature.to(logits.dtype).unsqueeze(-1))
    return logits.div_(temperature) if temperature != 1.0 else logits


def _chunk_t(temperature: float | Tensor, s: int, e: int) -> float | Tensor:
    return temperature[s:e] if isinstance(temperature, Tensor) else temperature


def _local_targets(targets: Tensor, vocab_start: int, local_vocab: int) -> tuple[Tensor, Tensor]:
    local = targets - vocab_start
    inside = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), inside


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, vocab_start, all_reduce):
        num, local_vocab = hidden.shape[0], weight.shape[0]
        logprobs = torch.empty(num, dtype=_acc_dtype(weight), device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for s in range(0, num, chunk_size):
            e = min(s + chunk_size, num)
            z = _chunk_logits(hidden[s:e], weight, _chunk_t(temperature, s, e))
            row_max = z.max(dim=-1).values
            if all_reduce is not None:
                all_reduce(row_max, "max")
            z.sub_(row_max.unsqueeze(-1))
            tgt, inside = _local_targets(targets[s:e], vocab_start, local_vocab)
            target_z = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * inside
            p = torch.exp(z)
            sum_exp = p.sum(dim=-1)
            sum_pz = p.mul_(z).sum(dim=-1)
            del z, p
            stats = torch.stack([sum_exp, sum_pz, target_z])
            if all_reduce is not None:
                all_reduce(stats, "sum")
            log_sum = stats[0].log()
            logprobs[s:e] = stats[2] - log_sum
            entropy[s:e] = log_sum - stats[1] / stats[0]
            lse[s:e] = row_max + log_sum
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = (chunk_size, temperature, vocab_start, all_reduce)
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        chunk_size, temperature, vocab_start, all_reduce = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprobs is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        num, local_vocab = hidden.shape[0], weight.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        wide = weight.dtype == _acc_dtype(weight)
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device) if need_w else None
        for s in range(0, num, chunk_size):
            e = min(s + chunk_size, num)
            t = _chunk_t(temperature, s, e)
            logp = _chunk_logits(hidden[s:e], weight, t).sub_(lse[s:e].unsqueeze(-1))
            grad_z = torch.exp(logp)  # p
            if grad_entropy is not None:  # dH/dz = -p (log p + H)
                g_ent = grad_entropy[s:e].to(logp.dtype).unsqueeze(-1)
                logp.add_(entropy[s:e].unsqueeze(-1)).mul_(grad_z).mul_(g_ent)
            else:
                logp = None
            if grad_logprobs is not None:  # dlogp_y/dz = onehot(y) - p
                g_lp = grad_logprobs[s:e].to(grad_z.dtype)
                grad_z.mul_(-g_lp.unsqueeze(-1))
                tgt, inside = _local_targets(targets[s:e], vocab_start, local_vocab)
                rows = torch.arange(e - s, device=grad_z.device)
                grad_z.index_put_((rows, tgt), g_lp * inside, accumulate=True)
            else:
                grad_z.zero_()
            if logp is not None:
                grad_z.sub_(logp)
            del logp
            if isinstance(t, Tensor):
                grad_z.div_(t.to(grad_z.dtype).unsqueeze(-1))
            elif t != 1.0:
                grad_z.div_(t)
            gz = grad_z.to(weight.dtype)
            if need_h:
                grad_h[s:e] = torch.mm(gz, weight).to(hidden.dtype)
            if need_w and wide:
                grad_w.addmm_(gz.t(), hidden[s:e].to(weight.dtype))
            elif need_w:
                grad_w.add_(torch.mm(gz.t(), hidden[s:e].to(weight.dtype)))
        if need_h and all_reduce is not None:
            all_reduce(grad_h, "sum")
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, temperature: Temperature) -> None:
    if hidden.shape[:-1] != targets.shape:
        shapes = f"hidden is {tuple(hidden.shape)} but targets is {tuple(targets.shape)}"
        raise ValueError(f"{shapes}: expected [*, H] and [*]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if targets.is_floating_point():
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(temperature, Tensor):
        if temperature.shape != targets.shape:
            raise ValueError(f"per-token temperature must have the targets' shape {tuple(targets.shape)}, "
                             f"got {tuple(temperature.shape)}")  # fmt: skip
        if temperature.numel() and not bool((temperature > 0).all()):
            raise ValueError(f"temperature must be > 0, got min {float(temperature.min())}")
    elif not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _flat_temperature(temperature: Temperature) -> float | Tensor:
    if isinstance(temperature, Tensor):
        return temperature.detach().reshape(-1).float()
    return float(temperature)


def vocab_parallel_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    vocab_start: int,
    all_reduce: AllReduce | None,
    chunk_size: int = 1024,
    temperature: Temperature = 1.0,
) -> tuple[Tensor, Tensor]:
    """``token_logprobs`` with the vocabulary sharded over a tensor-parallel group.

    Args:
        hidden: [*, H], identical on every rank of the group (the output layer's input).
        weight: [V_local, H], rows ``vocab_start .. vocab_start + V_local`` of the full output weight.
        targets: [*] token ids in the FULL vocabulary.
        all_reduce: in-place reduction over the group (see ``AllReduce``); None means no sharding.

    Returns:
        (logprobs, entropy), float32 [*], identical on every rank. The gradient w.r.t. ``hidden`` is
        summed over the group; the gradient w.r.t. ``weight`` is this rank's shard.
    """
    _check_shapes(hidden, weight, targets, chunk_size, temperature)
    if targets.numel() and int(targets.min()) < 0:
        raise ValueError(f"targets must be >= 0 (mask the loss instead of an ignore index), got {int(targets.min())}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).long()
    logprobs, entropy = _ChunkedTokenLogprobs.apply(
        flat_h, weight, flat_t, chunk_size, _flat_temperature(temperature), vocab_start, all_reduce
    )
    return logprobs.view(targets.shape), entropy.view(targets.shape)


def token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, chunk_size: int = 1024, temperature: Temperature = 1.0
) -> tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature)[targets] and the softmax entropy, chunked over rows.

    Args:
        hidden: [*, H] (any float dtype; cast to the weight's dtype for the matmul).
        weight: [V, H] output-layer weight.
        targets: [*] integer token ids in [0, V).
        chunk_size: rows per chunk; peak extra memory ~ 3 x chunk_size x V x 4 bytes.

    Returns:
        (logprobs, entropy): float32 [*] (float64 for a float64 weight). Differentiable w.r.t.
        ``hidden`` and ``weight``; matches ``naive_token_logprobs`` to float32 rounding.
    """
    _check_shapes(hidden, weight, targets, chunk_size, temperature)
    if targets.numel() and int(targets.max()) >= weight.shape[0]:
        raise ValueError(f"targets must be < vocabulary size {weight.shape[0]}, got {int(targets.max())}")
    return vocab_parallel_token_logprobs(
        hidden, weight, targets, vocab_start=0, all_reduce=None, chunk_size=chunk_size, temperature=temperature
    )


def naive_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: Temperature = 1.0
) -> tuple[Tensor, Tensor]:
    """Reference: materialises the full float32 logits [*, V]. Same contract as ``token_logprobs``."""
    t = temperature.unsqueeze(-1) if isinstance(temperature, Tensor) else temperature
    logits = (hidden.to(weight.dtype) @ weight.t()).to(torch.promote_types(weight.dtype, torch.float32)) / t
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1), entropy

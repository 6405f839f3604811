"""GRPO for long-horizon RL: group advantages over split rollouts and the clipped policy loss.

Dataflow: judged rollouts (reward Q_j, task id, number of windows K_j) -> ``compute_advantages`` (one
value per rollout, inherited by all its windows) -> windows batched as [B, T] token tensors ->
``policy_loss`` (PPO clip + KL + entropy + truncated importance sampling) summed over trained tokens
and divided by the step's GLOBAL trained-token count, which the caller passes in.

Pure tensor math: no process groups, no Megatron. Reductions across ranks (the global token count)
belong to the caller (``klong_megatron.megatron.rl_loss``). Metrics are local to this batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageMode = Literal["klong", "grpo", "dr_grpo", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
ADVANTAGE_MODES: tuple[str, ...] = ("klong", "grpo", "dr_grpo", "rloo")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOSS_AGGREGATIONS: tuple[str, ...] = ("token", "rollout")
"""How a rollout's tokens share the loss: each token weighs the same, or each rollout does (rl/windows.py)."""


def _check_rollout_inputs(rewards: Tensor, group_index: Tensor, num_windows: Tensor | None = None) -> None:
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got shape {tuple(rewards.shape)} dtype {rewards.dtype}")
    bad = (~torch.isfinite(rewards)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"rewards must be finite: rewards[{bad[0].item()}] = {rewards[bad[0]].item()}")
    named = {"group_index": group_index} | ({"num_windows": num_windows} if num_windows is not None else {})
    for name, t in named.items():
        if t.shape != rewards.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but rewards has shape {tuple(rewards.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if num_windows is not None and (num_windows < 0).any():
        i = (num_windows < 0).nonzero().flatten()[0].item()
        raise ValueError(f"num_windows must be >= 0: num_windows[{i}] = {num_windows[i].item()}")


def _group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def compute_advantages(
    rewards: Tensor,
    group_index: Tensor,
    num_windows: Tensor,
    mode: AdvantageMode = "klong",
    eps: float = 1e-6,
) -> Tensor:
    """One advantage per rollout; every window of rollout j is trained with A_j.

    Args:
        rewards: float [R], the judge's score Q_j of each rollout.
        group_index: integer [R]; rollouts of the same task share a value (any ids, need not be contiguous).
        num_windows: integer [R] >= 0, K_j = number of windows rollout j was split into.
        mode: ``klong``: Q_j minus the mean over all sub-trajectories (windows) of the group,
            sum_j' K_j' Q_j' / sum_j' K_j'; ``grpo``: (Q_j - mean) / (std + eps), std with Bessel's
            correction; ``dr_grpo``: Q_j - mean; ``rloo``: Q_j - mean of the OTHER rollouts of the group.
        eps: added to the group std in ``grpo`` mode.

    Returns:
        float [R] (dtype of ``rewards``). A group with a single rollout gets 0, as does a ``klong``
        group whose rollouts have no windows at all.

    Raises:
        ValueError: non-finite reward, shape mismatch, non-integer index, negative K, unknown mode.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    _check_rollout_inputs(rewards, group_index, num_windows)
    if rewards.numel() == 0:
        return rewards.clone()
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1
    count = _group_sum(torch.ones_like(rewards), inverse, num_groups)
    mean = _group_sum(rewards, inverse, num_groups) / count
    if mode == "klong":
        k = num_windows.to(rewards.dtype)
        total_k = _group_sum(k, inverse, num_groups)
        window_mean = _group_sum(k * rewards, inverse, num_groups) / total_k.clamp(min=1)
        adv = rewards - window_mean[inverse]
        adv = torch.where(total_k[inverse] > 0, adv, torch.zeros_like(adv))
    elif mode == "dr_grpo":
        adv = rewards - mean[inverse]
    elif mode == "grpo":
        centred = rewards - mean[inverse]
        var = _group_sum(centred.square(), inverse, num_groups) / (count - 1).clamp(min=1)
        adv = centred / (var.sqrt()[inverse] + eps)
    else:  # rloo
        n = count[inverse]
        adv = (rewards - mean[inverse]) * n / (n - 1).clamp(min=1)
    return torch.where(count[inverse] > 1, adv, torch.zeros_like(adv))


def zero_variance_groups(rewards: Tensor, group_index: Tensor, atol: float = 0.0) -> Tensor:
    """Flag rollouts whose group carries no learning signal (all rewards equal within ``atol``).

    Args:
        rewards: float [R]; group_index: integer [R] (as in ``compute_advantages``).

    Returns:
        bool [R], True for every rollout of a group with max - min <= atol (single-rollout groups
        included). Dynamic filtering drops these groups and over-samples new tasks instead.
    """
    _check_rollout_inputs(rewards, group_index)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1
    hi = torch.full((num_groups,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((num_groups,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, inverse, rewards, reduce="amax")
    lo = lo.scatter_reduce(0, inverse, rewards, reduce="amin")
    return (hi - lo <= atol)[inverse]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased).
    Shapes: any, equal; returns the same shape.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


def _check_token_inputs(logprobs: Tensor, advantages: Tensor, named: dict[str, Tensor | None]) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has shape {tuple(logprobs.shape)}")
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got shape {tuple(advantages.shape)}"
        )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss over the trained tokens of a batch of windows.

    Per token: max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(logp - old); for A < 0
    and ``clip_c`` set, capped at -A clip_c (dual clip); times the truncated importance weight
    min(exp(old - rollout), tis_cap) when ``rollout_logprobs`` and ``tis_cap`` are given; plus
    ``kl_coef`` * KL to ``ref_logprobs``; minus ``entropy_coef`` * ``entropy``.

    Args:
        logprobs: float [B, T], log pi(token) under the current policy (carries the gradient).
        old_logprobs, ref_logprobs, rollout_logprobs, entropy: float [B, T] (no gradient needed).
        advantages: float [B] (one per window) or [B, T].
        loss_mask: [B, T], 1 on trained tokens.
        num_tokens: GLOBAL count of trained tokens in the optimizer step (all micro-batches, all
            data-parallel ranks); defaults to this batch's ``loss_mask.sum()``.

    Returns:
        (loss, metrics): scalar loss = sum over masked tokens / num_tokens; metrics are detached
        scalars averaged over this batch's masked tokens: ``clip_frac``, ``dual_clip_frac``,
        ``approx_kl`` (k3 of old vs current), ``ratio_mean``, ``ratio_max``, and when their inputs
        are given ``entropy``, ``ref_kl``, ``tis_weight_mean``.
    """
    _check_token_inputs(
        logprobs,
        advantages,
        {
            "old_logprobs": old_logprobs,
            "loss_mask": loss_mask,
            "ref_logprobs": ref_logprobs,
            "entropy": entropy,
            "rollout_logprobs": rollout_logprobs,
        },
    )
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 (dual clip), got {clip_c}")
    if tis_cap is not None and (rollout_logprobs is None or tis_cap <= 0):
        raise ValueError(f"tis_cap={tis_cap} needs rollout_logprobs and a positive cap")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")

    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr = -adv * ratio
    surr_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(surr, surr_clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if clip_c is not None:
        dual = (adv < 0) & (per_token > -adv * clip_c)
        per_token = torch.where(dual, -adv * clip_c, per_token)
    metrics: dict[str, Tensor] = {}
    if rollout_logprobs is not None:
        weight = torch.exp(old_logprobs - rollout_logprobs).detach()
        if tis_cap is not None:
            weight = weight.clamp(max=tis_cap)
            per_token = per_token * weight
        metrics["tis_weight_mean"] = weight
    if kl_coef != 0.0 or ref_logprobs is not None:
        ref_kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * ref_kl
        metrics["ref_kl"] = ref_kl
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        metrics["entropy"] = entropy

    total = mask.sum()
    denom = total if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
    loss = (per_token * mask).sum() / denom.clamp(min=1)

    with torch.no_grad():
        n = total.clamp(min=1)
        metrics |= {
            "clip_frac": (surr_clipped > surr).to(mask.dtype),
            "dual_clip_frac": dual.to(mask.dtype),
            "approx_kl": kl_penalty(old_logprobs, logprobs, "k3"),
            "ratio_mean": ratio,
        }
        metrics = {k: (v.detach() * mask).sum() / n for k, v in metrics.items()}
        masked_ratio = torch.where(mask > 0, ratio.detach(), torch.zeros_like(ratio))
        metrics["ratio_max"] = masked_ratio.max() if masked_ratio.numel() else total
    return loss, metrics

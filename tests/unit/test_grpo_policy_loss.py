"""PPO-clip policy loss: clipping, dual clip, KL estimators, entropy, TIS, global token normalisation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_megatron.algo.grpo import kl_penalty, policy_loss


def _batch(b=3, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = (old + 0.3 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[0, 0] = 1.0
    return logp, old, adv, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_pushes_logprob_along_advantage() -> None:
    logp, _, adv, mask = _batch()
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask)
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, logp), -adv[:, None].expand_as(mask) * mask / mask.sum())
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("adv", "log_ratio", "clip_high", "has_grad"),
    [
        (1.0, 0.5, 0.2, False),  # r = 1.65 > 1.2, positive advantage: clipped
        (1.0, -0.5, 0.2, True),  # r = 0.61, positive advantage: pessimistic min keeps the gradient
        (-1.0, -0.5, 0.2, False),  # r < 0.8, negative advantage: clipped
        (-1.0, 0.5, 0.2, True),  # r > 1.2, negative advantage: not clipped
        (1.0, 0.22, 0.2, False),  # r = 1.246 > 1.2
        (1.0, 0.22, 0.28, True),  # clip-higher: r = 1.246 < 1.28 still trained
    ],
)
def test_clipping_stops_gradient_only_outside_the_trust_region(adv, log_ratio, clip_high, has_grad) -> None:
    old = torch.full((1, 1), -1.0)
    logp = (old + log_ratio).requires_grad_()
    loss, metrics = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), clip_high=clip_high)
    assert (_grad(loss, logp).abs().item() > 0) == has_grad
    assert metrics["clip_frac"].item() == (0.0 if has_grad else 1.0)


def test_dual_clip_bounds_the_loss_of_negative_advantage_tokens() -> None:
    old = torch.full((1, 1), -3.0)
    logp = (old + torch.log(torch.tensor(5.0))).requires_grad_()  # ratio 5
    adv, mask = torch.tensor([-2.0]), torch.ones(1, 1)
    plain, _ = policy_loss(logp, old, adv, mask)
    dual, metrics = policy_loss(logp, old, adv, mask, clip_c=3.0)
    assert plain.item() == pytest.approx(10.0, rel=1e-5)
    assert dual.item() == pytest.approx(6.0)
    assert _grad(dual, logp).item() == 0.0
    assert metrics["dual_clip_frac"].item() == 1.0
    pos, _ = policy_loss(logp, old, torch.tensor([2.0]), mask, clip_c=3.0)  # dual clip ignores A > 0
    assert pos.item() == pytest.approx(-2.0 * 1.2)


def test_kl_estimators_k1_and_k3_are_unbiased_and_k3_nonnegative() -> None:
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(20, generator=g), 0)
    q = torch.softmax(torch.randn(20, generator=g), 0)
    true_kl = (p * (p.log() - q.log())).sum()
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    for est in ("k1", "k3"):
        assert kl_penalty(logp, logq, est).mean().item() == pytest.approx(true_kl.item(), rel=0.03)
    assert (kl_penalty(logp, logq, "k3") >= 0).all()
    assert (kl_penalty(logp, logq, "k2") >= 0).all()
    assert kl_penalty(logp, logp, "k3").abs().max().item() == 0.0


def test_kl_and_entropy_terms_shift_the_loss_by_their_masked_means() -> None:
    logp, old, adv, mask = _batch()
    ref = old - 0.1
    ent = torch.rand_like(old) * 2
    base, _ = policy_loss(logp, old, adv, mask)
    full, m = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.5, entropy=ent, entropy_coef=0.01)
    kl_mean = (kl_penalty(logp, ref, "k3") * mask).sum() / mask.sum()
    ent_mean = (ent * mask).sum() / mask.sum()
    torch.testing.assert_close(full, base + 0.5 * kl_mean - 0.01 * ent_mean)
    torch.testing.assert_close(m["ref_kl"], kl_mean.detach())
    torch.testing.assert_close(m["entropy"], ent_mean)


def test_truncated_importance_weight_scales_each_token_and_is_capped() -> None:
    old = torch.tensor([[-1.0, -1.0]])
    rollout = torch.tensor([[-1.5, -5.0]])  # exp(old - rollout) = 1.65, 54.6 -> capped at 2
    logp = old.clone().requires_grad_()
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), rollout_logprobs=rollout, tis_cap=2.0)
    w = torch.tensor([[torch.exp(torch.tensor(0.5)).item(), 2.0]])
    torch.testing.assert_close(loss, -(w.sum() / 2))
    torch.testing.assert_close(m["tis_weight_mean"], w.mean())


def test_masked_tokens_do_not_change_loss_or_gradient() -> None:
    logp, old, adv, mask = _batch()
    noisy_old = torch.where(mask > 0, old, old + 7.0)
    a, _ = policy_loss(logp, old, adv, mask)
    b, _ = policy_loss(logp, noisy_old, adv, mask)
    torch.testing.assert_close(a, b)
    grad_a = _grad(a, logp)
    torch.testing.assert_close(grad_a, _grad(b, logp))
    assert (grad_a[mask == 0] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_microbatches_with_global_token_count_sum_to_the_full_batch_loss(split, seed) -> None:
    logp, old, adv, mask = _batch(b=6, t=7, seed=seed)
    full, _ = policy_loss(logp, old, adv, mask)
    n = mask.sum()
    parts = [
        policy_loss(logp[i : i + split], old[i : i + split], adv[i : i + split], mask[i : i + split], num_tokens=n)[0]
        for i in range(0, 6, split)
    ]
    torch.testing.assert_close(sum(parts), full)


def test_per_token_advantages_equal_broadcast_per_window_advantages() -> None:
    logp, old, adv, mask = _batch()
    a, _ = policy_loss(logp, old, adv, mask, clip_c=3.0)
    b, _ = policy_loss(logp, old, adv[:, None].expand_as(old), mask, clip_c=3.0)
    torch.testing.assert_close(a, b)


def test_ratio_max_ignores_masked_tokens() -> None:
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, 2.0, 0.0]])
    _, m = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0, 1.0]]))
    assert m["ratio_max"].item() == pytest.approx(torch.exp(torch.tensor(0.1)).item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "old_logprobs has shape"),
        ({"loss_mask": torch.ones(3, 4)}, "loss_mask has shape"),
        ({"advantages": torch.zeros(2, 5)}, "advantages must be"),
        ({"clip_c": 0.9}, "clip_c must be > 1"),
        ({"tis_cap": 2.0}, "tis_cap=2.0 needs rollout_logprobs"),
        ({"kl_coef": 0.1}, "kl_coef=0.1 needs ref_logprobs"),
        ({"entropy_coef": 0.1}, "entropy_coef=0.1 needs entropy"),
        ({"clip_low": -0.1}, "clip_low and clip_high"),
    ],
)
def test_bad_arguments_are_named(kwargs, match) -> None:
    args = {"old_logprobs": torch.zeros(2, 3), "advantages": torch.zeros(2), "loss_mask": torch.ones(2, 3)}
    args |= kwargs
    pos = [args.pop(k) for k in ("old_logprobs", "advantages", "loss_mask")]
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(2, 3), *pos, **args)

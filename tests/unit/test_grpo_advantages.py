"""Group advantages over split rollouts (klong / grpo / dr_grpo / rloo) and zero-variance flags."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from klong_megatron.algo.grpo import ADVANTAGE_MODES, compute_advantages, zero_variance_groups

rollouts = st.lists(
    st.tuples(
        st.integers(0, 3),  # task id
        st.floats(-5, 5, allow_nan=False, width=32),  # reward
        st.integers(0, 6),  # windows
    ),
    min_size=1,
    max_size=12,
)


def _tensors(rows):
    group = torch.tensor([r[0] for r in rows])
    reward = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    k = torch.tensor([r[2] for r in rows])
    return reward, group, k


@settings(max_examples=60, deadline=None)
@given(rollouts)
def test_klong_advantage_is_reward_minus_mean_over_all_windows_of_the_group(rows) -> None:
    reward, group, k = _tensors(rows)
    adv = compute_advantages(reward, group, k, mode="klong")
    for j in range(len(rows)):
        members = (group == group[j]).nonzero().flatten().tolist()
        # one entry per sub-trajectory (window) of every rollout of the task
        window_rewards = [reward[m].item() for m in members for _ in range(int(k[m]))]
        if len(members) == 1 or not window_rewards:
            assert adv[j].item() == 0.0
        else:
            expected = reward[j].item() - sum(window_rewards) / len(window_rewards)
            assert adv[j].item() == pytest.approx(expected, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(rollouts)
def test_grpo_rloo_dr_grpo_match_a_per_group_loop(rows) -> None:
    reward, group, k = _tensors(rows)
    got = {m: compute_advantages(reward, group, k, mode=m) for m in ("grpo", "dr_grpo", "rloo")}
    for j in range(len(rows)):
        q = reward[group == group[j]]
        if q.numel() == 1:
            assert all(got[m][j].item() == 0.0 for m in got)
            continue
        assert got["dr_grpo"][j].item() == pytest.approx((reward[j] - q.mean()).item(), abs=1e-9)
        assert got["grpo"][j].item() == pytest.approx(((reward[j] - q.mean()) / (q.std() + 1e-6)).item(), abs=1e-6)
        others = (q.sum() - reward[j]) / (q.numel() - 1)
        assert got["rloo"][j].item() == pytest.approx((reward[j] - others).item(), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(rollouts, st.randoms(use_true_random=False))
def test_advantages_follow_their_rollout_under_permutation(rows, rnd) -> None:
    reward, group, k = _tensors(rows)
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)
    for mode in ADVANTAGE_MODES:
        a = compute_advantages(reward, group, k, mode=mode)
        b = compute_advantages(reward[perm_t], group[perm_t], k[perm_t], mode=mode)
        torch.testing.assert_close(a[perm_t], b)


@settings(max_examples=40, deadline=None)
@given(rollouts)
def test_klong_window_weighted_advantages_sum_to_zero_per_group(rows) -> None:
    reward, group, k = _tensors(rows)
    adv = compute_advantages(reward, group, k, mode="klong")
    for g in group.unique():
        sel = group == g
        assert (adv[sel] * k[sel]).sum().item() == pytest.approx(0.0, abs=1e-9)


def test_klong_weights_long_rollouts_more_than_plain_mean() -> None:
    # task 7: a short failed rollout (1 window) and a long successful one (3 windows)
    reward, group, k = torch.tensor([0.0, 1.0]), torch.tensor([7, 7]), torch.tensor([1, 3])
    klong = compute_advantages(reward, group, k, mode="klong")
    torch.testing.assert_close(klong, torch.tensor([-0.75, 0.25]))
    torch.testing.assert_close(compute_advantages(reward, group, k, mode="dr_grpo"), torch.tensor([-0.5, 0.5]))


def test_klong_equals_dr_grpo_when_all_rollouts_have_equal_windows() -> None:
    reward = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.8])
    group = torch.tensor([100, 100, 100, 5, 5])
    k = torch.full((5,), 4)
    torch.testing.assert_close(
        compute_advantages(reward, group, k, mode="klong"), compute_advantages(reward, group, k, mode="dr_grpo")
    )


def test_grpo_group_with_identical_rewards_gets_zero_not_nan() -> None:
    adv = compute_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long), "grpo")
    assert torch.equal(adv, torch.zeros(4))


@pytest.mark.parametrize(
    ("rewards", "group", "k", "mode", "match"),
    [
        ([0.0, float("nan")], [0, 0], [1, 1], "klong", r"rewards\[1\]"),
        ([0.0, float("inf")], [0, 0], [1, 1], "grpo", r"rewards\[1\]"),
        ([0.0, 1.0], [0, 0, 0], [1, 1], "klong", "group_index has shape"),
        ([0.0, 1.0], [0, 0], [1], "klong", "num_windows has shape"),
        ([0.0, 1.0], [0, 0], [1, -2], "klong", r"num_windows\[1\] = -2"),
        ([0.0, 1.0], [0, 0], [1, 1], "ppo", "mode must be one of"),
    ],
)
def test_invalid_input_is_rejected_with_its_name(rewards, group, k, mode, match) -> None:
    with pytest.raises(ValueError, match=match):
        compute_advantages(torch.tensor(rewards), torch.tensor(group), torch.tensor(k), mode=mode)


def test_float_group_index_is_rejected() -> None:
    with pytest.raises(ValueError, match="group_index must be an integer tensor"):
        compute_advantages(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.long))


def test_empty_batch_gives_empty_advantages() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    assert compute_advantages(torch.zeros(0), empty, empty).shape == (0,)


def test_zero_variance_groups_flags_uninformative_tasks() -> None:
    reward = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.2, 0.3])
    group = torch.tensor([0, 0, 1, 1, 2, 3])
    flags = zero_variance_groups(reward, group)
    assert flags.tolist() == [True, True, False, False, True, True]
    assert zero_variance_groups(torch.tensor([0.5, 0.50001]), torch.tensor([9, 9]), atol=1e-3).tolist() == [True, True]

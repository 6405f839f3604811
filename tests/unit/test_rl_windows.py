"""RL windows: shared advantages, trained tokens = sampled tokens, staleness, packed-row alignment."""

from __future__ import annotations

import numpy as np
import pytest

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.trajectory import Message, Trajectory
from klong_megatron.rl.windows import JudgedRollout, build_rl_windows, pack_rows, split_rollout, token_arrays

HEADER, SUFFIX = 3, 1


def recorded(rid: str, turns: int, *, seed: int = 0, version: int = 0, eot_appended_at: int | None = None):
    """A rollout as the agent loop records it: system, user, then (assistant, tool) x turns.

    Every assistant message is HEADER + generated + SUFFIX tokens; on turn ``eot_appended_at`` the last
    generated token was appended by the agent (not sampled: one output id fewer, no log-prob)."""
    rng = np.random.default_rng(seed)
    messages = [Message("system", "s"), Message("user", "u")]
    ids = [rng.integers(10, 500, 12).tolist(), rng.integers(10, 500, 20).tolist()]
    steps = []
    for t in range(turns):
        gen = rng.integers(10, 500, int(rng.integers(5, 30))).tolist()
        messages.append(Message("assistant", f"a{t}"))
        ids.append([1, 2, 3, *gen, 4])
        sampled = gen[:-1] if t == eot_appended_at else gen
        steps.append(
            {
                "message": len(messages) - 1,
                "output_ids": sampled,
                "logprobs": (-rng.random(len(sampled))).tolist(),
                "weight_version": version,
                "header_len": HEADER,
                "suffix_len": SUFFIX,
            }
        )
        messages.append(Message("tool", f"o{t}"))
        ids.append(rng.integers(10, 500, int(rng.integers(10, 60))).tolist())
    return Trajectory(rid, messages, {"message_ids": ids, "steps": steps})


def policy(max_len: int = 4096, overlap: int = 0) -> ContextPolicy:
    return ContextPolicy(ContextPolicyConfig(max_len=max_len, overlap=overlap), np.array([7, 8, 9]), np.array([6]))


def test_token_arrays_mark_exactly_the_sampled_tokens():
    traj = recorded("r", 4, eot_appended_at=2)
    logprobs, versions = token_arrays(traj)
    sampled = sum(len(s["output_ids"]) for s in traj.meta["steps"])
    assert (versions >= 0).sum() == sampled
    assert np.isfinite(logprobs).sum() == sampled
    step = traj.meta["steps"][1]
    start = sum(len(m) for m in traj.meta["message_ids"][: step["message"]]) + HEADER
    np.testing.assert_allclose(logprobs[start : start + len(step["output_ids"])], step["logprobs"], rtol=1e-6)


def test_appended_eot_is_never_trained_and_every_sampled_token_once():
    traj = recorded("r", 12, seed=3, eot_appended_at=5)
    windows = split_rollout(traj, policy(max_len=200))
    assert len(windows) > 1
    trained = np.concatenate([pos[mask.astype(bool)] for _, mask, pos in windows])
    _, versions = token_arrays(traj)
    assert sorted(trained.tolist()) == np.flatnonzero(versions >= 0).tolist()


def test_every_window_of_a_rollout_shares_its_group_relative_advantage():
    rollouts = [
        JudgedRollout(recorded(f"a{i}", 10, seed=i), reward, "task-a") for i, reward in enumerate([1.0, 0.0, 0.5])
    ] + [JudgedRollout(recorded(f"b{i}", 3, seed=10 + i), reward, "task-b") for i, reward in enumerate([0.2, 0.8])]
    windows, stats = build_rl_windows(rollouts, policy(max_len=200), mode="grpo")
    by_rollout: dict[str, set[float]] = {}
    for w in windows:
        by_rollout.setdefault(w.rollout_id, set()).add(w.advantage)
    assert all(len(a) == 1 for a in by_rollout.values())
    adv = {k: v.pop() for k, v in by_rollout.items()}
    assert adv["a0"] > adv["a2"] > adv["a1"] and adv["b1"] > 0 > adv["b0"]
    assert adv["a0"] == pytest.approx(1.0, abs=1e-4)  # (1 - 0.5) / std([1, 0, .5]) = 1
    assert stats["rollouts"] == 5 and stats["windows"] == len(windows) and stats["windows_per_rollout"] > 1


def test_zero_variance_groups_are_filtered_unless_disabled():
    rollouts = [JudgedRollout(recorded(f"z{i}", 2, seed=i), 1.0, "same") for i in range(3)]
    rollouts.append(JudgedRollout(recorded("x0", 2, seed=7), 1.0, "other"))
    rollouts.append(JudgedRollout(recorded("x1", 2, seed=8), 0.0, "other"))
    windows, stats = build_rl_windows(rollouts, policy())
    assert {w.group for w in windows} == {"other"} and stats["filtered_groups"] == 1
    kept, _ = build_rl_windows(rollouts, policy(), filter_zero_variance=False)
    assert {w.group for w in kept} == {"same", "other"}


def test_windows_older_than_max_staleness_are_dropped():
    rollouts = [
        JudgedRollout(recorded("old", 3, seed=1, version=1), 1.0, "g"),
        JudgedRollout(recorded("new", 3, seed=2, version=3), 0.0, "g"),
    ]
    windows, stats = build_rl_windows(rollouts, policy(), current_version=3, max_staleness=1)
    assert [w.rollout_id for w in windows] == ["new"] and stats["dropped_stale"] == 1
    assert stats["staleness_max"] == 0
    windows, stats = build_rl_windows(rollouts, policy(), current_version=3, max_staleness=2)
    assert len(windows) == 2 and stats["staleness_max"] == 2 and stats["staleness_mean"] == 1


def test_packed_rows_align_advantages_and_logprobs_with_labels():
    rollouts = [JudgedRollout(recorded(f"r{i}", 5, seed=i), float(i), "g") for i in range(3)]
    windows, _ = build_rl_windows(rollouts, policy(max_len=300))
    rows = pack_rows(windows, 1024, pad_id=0)
    assert sum(int(r["loss_mask"].sum()) for r in rows) == sum(int(w.loss_mask[1:].sum()) for w in windows)
    for row in rows:
        m = row["loss_mask"].astype(bool)
        assert np.isfinite(row["rollout_logprobs"][m]).all()
        assert (row["advantages"][m] != 0).all()
    # labels[t] = tokens[t + 1]; its log-prob is the one the engine reported for that sampled token.
    reported = {
        (t, round(p, 5))
        for r in rollouts
        for s in r.trajectory.meta["steps"]
        for t, p in zip(s["output_ids"], s["logprobs"], strict=True)
    }
    for row in rows:
        for t in np.flatnonzero(row["loss_mask"]):
            assert (int(row["labels"][t]), round(float(row["rollout_logprobs"][t]), 5)) in reported


def test_window_longer_than_a_row_is_an_error():
    windows, _ = build_rl_windows(
        [JudgedRollout(recorded("r", 6), 1.0, "g"), JudgedRollout(recorded("s", 6), 0.0, "g")], policy()
    )
    with pytest.raises(ValueError):
        pack_rows(windows, 16, pad_id=0)

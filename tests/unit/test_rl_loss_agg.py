"""``algo.loss_agg``: how a rollout's trained tokens share the loss (``rl/windows.py``).

``token`` (the paper): A_j on every token, so a long rollout weighs in proportion to its tokens; with the
``klong`` baseline (mean over windows) the advantages sum to ~0 over windows. ``rollout``: A_j scaled by
mean_tokens / tokens_j, so each rollout's advantage-weighted token sum is A_j x mean_tokens; with the
``dr_grpo`` baseline a group's sum is then exactly 0 however long its rollouts are (``adv_token_mean``).
"""

from __future__ import annotations

import numpy as np
import pytest

from klong_megatron.rl.windows import JudgedRollout, build_rl_windows
from tests.unit.test_rl_windows import policy, recorded


def _weights(windows) -> dict[str, float]:
    """Advantage-weighted trained-token sum per rollout (what the loss multiplies its log-probs by)."""
    out: dict[str, float] = {}
    for w in windows:
        out[w.rollout_id] = out.get(w.rollout_id, 0.0) + w.advantage * float(w.loss_mask.sum())
    return out


def _group():  # a long failing rollout and two short ones: lengths differ ~4x
    return [JudgedRollout(recorded("long", 16, seed=1), 0.0, "t"), JudgedRollout(recorded("s1", 4, seed=2), 1.0, "t"),
            JudgedRollout(recorded("s2", 4, seed=3), 0.5, "t")]  # fmt: skip


def test_token_aggregation_lets_the_long_failing_rollout_dominate() -> None:
    windows, stats = build_rl_windows(_group(), policy(max_len=4096), mode="dr_grpo", loss_agg="token")
    w = _weights(windows)
    assert abs(w["long"]) > w["s1"] + w["s2"]  # pushes sampled tokens down on balance
    assert stats["adv_token_mean"] < 0


def test_rollout_aggregation_gives_each_rollout_its_advantage_times_mean_tokens() -> None:
    windows, stats = build_rl_windows(_group(), policy(max_len=4096), mode="dr_grpo", loss_agg="rollout")
    tokens = {}
    for win in windows:
        tokens[win.rollout_id] = tokens.get(win.rollout_id, 0.0) + float(win.loss_mask.sum())
    mean = np.mean(list(tokens.values()))
    w = _weights(windows)
    for rid, adv in {"long": -0.5, "s1": 0.5, "s2": 0.0}.items():
        assert w[rid] == pytest.approx(adv * mean, rel=1e-5)
    assert stats["adv_token_mean"] == pytest.approx(0.0, abs=1e-6)


def test_rollout_aggregation_spans_a_rollouts_windows() -> None:
    windows, _ = build_rl_windows(_group(), policy(max_len=200), mode="dr_grpo", loss_agg="rollout")
    assert sum(w.rollout_id == "long" for w in windows) > 1  # split: the scale uses all its windows' tokens
    assert len({w.advantage for w in windows if w.rollout_id == "long"}) == 1


def test_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_agg"):
        build_rl_windows(_group(), policy(), loss_agg="sequence")

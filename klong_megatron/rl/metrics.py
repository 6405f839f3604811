"""Metrics of an RL iteration: rollout statistics, judge categories and the W&B sample table.

Judged trajectories (``meta``: reward, turns, duration_s, tokens, judge_*) -> one flat dict of floats per
iteration (``rollout_metrics``) and the best / worst rollouts as table rows (``sample_rows``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from klong_megatron.data.trajectory import Trajectory

SAMPLE_COLUMNS = ("task", "reward", "turns", "wall_s", "finish", "transcript")


def sample_rows(trajs: list[Trajectory], k: int = 4, chars: int = 6000) -> list[list[Any]]:
    """The best and worst rollouts of an iteration (up to ``k``) as W&B table rows; long transcripts
    keep their head and tail."""
    ranked = sorted(trajs, key=lambda t: t.meta["reward"])
    picked = list({t.id: t for t in ranked[len(ranked) - k // 2 :][::-1] + ranked[: k - k // 2]}.values())
    rows = []
    for t in picked:
        text = "\n\n".join(f"[{m.role}] {m.content}" + "".join(f"\n-> {c.name}({c.arguments})" for c in m.tool_calls)
                           for m in t.messages)  # fmt: skip
        if len(text) > chars:
            text = f"{text[: chars // 2]}\n[...]\n{text[-chars // 2 :]}"
        m = t.meta
        rows.append([m["task"], m["reward"], m["turns"], m["duration_s"], m.get("finish_reason"), text])
    return rows


def rollout_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Reward, judge categories, turns, wall time, timeouts and tokens of one iteration's rollouts."""
    if not trajs:
        return {}
    rewards = np.array([t.meta["reward"] for t in trajs])
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "turns": float(np.mean([t.meta["turns"] for t in trajs])),
        "rollout_wall_s": float(np.mean([t.meta["duration_s"] for t in trajs])),
        "timeout_frac": float(np.mean([bool(t.meta.get("timed_out")) for t in trajs])),
        "tokens": float(np.sum([t.meta["tokens"] for t in trajs])),
        "submitted_frac": float(np.mean([t.meta.get("finish_reason") == "submitted" for t in trajs])),
        "judge/excluded": float(sum(bool(t.meta.get("reward_excluded")) for t in trajs)),
        "judge/invalid_frac": float(np.mean([t.meta.get("judge_invalid_frac", 0.0) for t in trajs])),
        "blacklist_flagged": float(sum(bool(t.meta.get("blacklist_flagged")) for t in trajs)),
    }
    if slots := [t.meta["slot_s"] for t in trajs if "slot_s" in t.meta]:  # refill: slot time incl. sandbox start
        out["rollout_slot_s"] = float(np.mean(slots))
    out |= {f"judge/{k}": v for k, v in category_means(trajs).items()}
    for k in ("calls", "prompt_tokens", "completion_tokens"):  # judge cost of this iteration's rollouts
        out[f"judge/{k}"] = float(sum(t.meta.get("judge_token_usage", {}).get(k, 0) for t in trajs))
    return out


def category_means(trajs: list[Trajectory]) -> dict[str, float]:
    """Mean judge score per rubric category over the rollouts that have one."""
    cats: dict[str, list[float]] = {}
    for t in trajs:
        for k, v in t.meta.get("judge_per_category", {}).items():
            cats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in cats.items()}

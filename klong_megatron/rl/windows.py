"""Judged rollouts -> RL training rows: windows, shared advantages, staleness, packed sequences.

Dataflow: recorded rollout (``meta.message_ids``/``steps``, see ``rollout/agent.py``) + judge reward ->
``rendered_from_record`` -> ``split_trajectory`` with the SFT splitter's ContextPolicy (the windows are
exactly the contexts the agent saw) -> one advantage per rollout (``compute_advantages``; every window of
a rollout inherits it) -> per-token rollout log-probs and policy versions gathered through
``Window.positions`` -> windows older than ``max_staleness`` versions dropped -> packed rows of
``seq_len`` tokens (best-fit, per-window position ids, block-diagonal attention) with per-token
``advantages``, ``rollout_logprobs`` and ``temperatures`` (each token's sampling temperature, recorded per
turn by the agent loop: old/reference log-probs and TIS are computed at it) aligned with ``labels``.

Trained tokens are the engine's sampled tokens only: an end-of-turn token the agent appended after a
turn cut by ``max_new_tokens`` has no behaviour log-prob and is not trained. Pure numpy/torch math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from klong_megatron.algo.grpo import LOSS_AGGREGATIONS, compute_advantages, zero_variance_groups
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.pack import build_sequence, pack_lengths
from klong_megatron.data.split import split_trajectory
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.rollout.agent import rendered_from_record


@dataclass
class JudgedRollout:
    """A finished rollout, its judge score in [0, 1] and its GRPO group (the task within the iteration)."""

    trajectory: Trajectory
    reward: float
    group: str


@dataclass
class RLWindow:
    """One training window of a rollout."""

    rollout_id: str
    group: str
    input_ids: np.ndarray
    """int32 [L]"""
    loss_mask: np.ndarray
    """uint8 [L]: 1 on sampled assistant tokens trained in this window"""
    rollout_logprobs: np.ndarray
    """float32 [L]: the engine's log-prob of each token; NaN where it has none"""
    advantage: float
    version: int
    """oldest policy version that sampled one of the trained tokens (staleness = current - version)"""
    temperatures: np.ndarray | None = None
    """float32 [L]: the temperature each token was sampled at (SGLang's log-prob temperature); NaN where the
    record has none (the trainer then uses ``rollout.sampling.temperature``)"""

    def __len__(self) -> int:
        return len(self.input_ids)


def _version(v: object) -> int:
    return int(v) if isinstance(v, int) or (isinstance(v, str) and v.isdigit()) else 0


def token_arrays(traj: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Per position of the full rendering: (rollout log-prob float32 [N], NaN where none; policy version
    int64 [N], -1 where the engine did not sample the token: prompt, headers, suffixes, appended eot)."""
    lens = [len(m) for m in traj.meta["message_ids"]]
    starts = np.concatenate([[0], np.cumsum(lens)])
    logprobs = np.full(int(starts[-1]), np.nan, np.float32)
    versions = np.full(int(starts[-1]), -1, np.int64)
    for step in traj.meta["steps"]:
        s = int(starts[step["message"]]) + int(step["header_len"])
        n = len(step["output_ids"])
        if step.get("logprobs") is not None and len(step["logprobs"]) == n:
            logprobs[s : s + n] = np.asarray(step["logprobs"], np.float32)
        versions[s : s + n] = _version(step.get("weight_version"))
    return logprobs, versions


GREEDY_EPS = 1e-6
"""SGLang samples below this temperature greedily and reports log-probs at temperature 1.0
(sglang 0.5.23 ``srt/sampling/sampling_params.py``: ``temperature = 1.0; top_k = 1``)."""


def token_temperatures(traj: Trajectory) -> np.ndarray:
    """float32 [N] per position of the full rendering: the sampling temperature of the turn that generated
    the token (greedy turns: 1.0, as SGLang scores them); NaN elsewhere and for records without one."""
    lens = [len(m) for m in traj.meta["message_ids"]]
    starts = np.concatenate([[0], np.cumsum(lens)])
    out = np.full(int(starts[-1]), np.nan, np.float32)
    for step in traj.meta["steps"]:
        t = step.get("temperature")
        if t is None:
            continue
        s = int(starts[step["message"]]) + int(step["header_len"])
        out[s : s + len(step["output_ids"])] = 1.0 if float(t) < GREEDY_EPS else float(t)
    return out


def split_rollout(
    traj: Trajectory, policy: ContextPolicy, versions: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Windows of one rollout as (input_ids, loss_mask, positions); trained = sampled assistant tokens.

    ``versions``: ``token_arrays(traj)[1]`` when the caller already has it."""
    if versions is None:
        versions = token_arrays(traj)[1]
    out = []
    for w in split_trajectory(rendered_from_record(traj), policy):
        sampled = np.where(w.positions >= 0, versions[np.maximum(w.positions, 0)] >= 0, False)
        out.append((w.input_ids, (w.loss_mask.astype(bool) & sampled).astype(np.uint8), w.positions))
    return out


def build_rl_windows(
    rollouts: Sequence[JudgedRollout],
    policy: ContextPolicy,
    *,
    mode: str = "klong",
    eps: float = 1e-6,
    filter_zero_variance: bool = True,
    current_version: int = 0,
    max_staleness: int | None = None,
    loss_agg: str = "token",
) -> tuple[list[RLWindow], dict[str, float]]:
    """Split, advantage, filter. Returns (windows, stats).

    ``loss_agg``: ``token`` keeps A_j on every trained token (the loss divides by the step's token
    count, so a rollout weighs in proportion to its trained tokens); ``rollout`` scales A_j by
    mean_tokens / tokens_j (tokens over the kept windows), so every rollout weighs the same in total.

    Stats: ``rollouts``, ``windows`` (kept), ``windows_per_rollout`` (before filtering),
    ``filtered_groups`` (zero-variance groups dropped), ``dropped_stale`` (windows older than
    ``max_staleness``), ``staleness_mean`` and ``staleness_max`` over kept windows, ``adv_token_mean``
    (advantage averaged over the kept trained tokens: below 0 the step pushes sampled tokens down on
    balance, which raises entropy).
    """
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")
    if not rollouts:
        return [], {"rollouts": 0.0, "windows": 0.0}
    arrays = [token_arrays(r.trajectory) for r in rollouts]
    split = [split_rollout(r.trajectory, policy, versions) for r, (_, versions) in zip(rollouts, arrays, strict=True)]
    groups = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in rollouts))}
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float64)
    group_index = torch.tensor([groups[r.group] for r in rollouts])
    num_windows = torch.tensor([len(ws) for ws in split])
    adv = compute_advantages(rewards, group_index, num_windows, mode=mode, eps=eps)  # type: ignore[arg-type]
    flat = (
        zero_variance_groups(rewards, group_index) if filter_zero_variance else torch.zeros(len(rollouts), dtype=bool)
    )
    out: list[RLWindow] = []
    dropped = 0
    for r, ws, (logprobs, versions), a, skip in zip(rollouts, split, arrays, adv.tolist(), flat.tolist(), strict=True):
        if skip:
            continue
        temps = token_temperatures(r.trajectory)
        for ids, mask, pos in ws:
            if not mask.any():
                continue
            safe = np.maximum(pos, 0)
            lp = np.where(pos >= 0, logprobs[safe], np.nan).astype(np.float32)
            tw = np.where(pos >= 0, temps[safe], np.nan).astype(np.float32)
            version = int(versions[safe][mask.astype(bool)].min())
            if max_staleness is not None and current_version - version > max_staleness:
                dropped += 1
                continue
            out.append(RLWindow(r.trajectory.id, r.group, ids, mask, lp, float(a), version, tw))
    if loss_agg == "rollout" and out:
        out = _equal_rollout_weight(out)
    stale = [current_version - w.version for w in out]
    tokens = np.array([w.loss_mask.sum() for w in out], np.float64)
    stats = {
        "rollouts": float(len(rollouts)),
        "windows": float(len(out)),
        "windows_per_rollout": float(num_windows.float().mean()),
        "filtered_groups": float(len({r.group for r, f in zip(rollouts, flat.tolist(), strict=True) if f})),
        "dropped_stale": float(dropped),
        "staleness_mean": float(np.mean(stale)) if stale else 0.0,
        "staleness_max": float(max(stale)) if stale else 0.0,
        "adv_token_mean": float(np.dot(tokens, [w.advantage for w in out]) / tokens.sum()) if out else 0.0,
    }
    return out, stats


def _equal_rollout_weight(windows: list[RLWindow]) -> list[RLWindow]:
    """Scale each rollout's advantage by mean_tokens / its trained tokens (``loss_agg=rollout``)."""
    tokens: dict[str, float] = {}
    for w in windows:
        tokens[w.rollout_id] = tokens.get(w.rollout_id, 0.0) + float(w.loss_mask.sum())
    mean = float(np.mean(list(tokens.values())))
    return [dataclasses.replace(w, advantage=w.advantage * mean / tokens[w.rollout_id]) for w in windows]


def pack_rows(windows: Sequence[RLWindow], seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Pack windows into rows of ``seq_len`` tokens (best-fit decreasing, deterministic).

    Each row: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, ``cu_seqlens`` as in
    ``data.pack.build_sequence``, plus ``advantages`` float32 [S] (the window's advantage on its
    tokens), ``rollout_logprobs`` float32 [S] (log-prob of ``labels[t]``; NaN where unknown),
    ``temperatures`` float32 [S] (the temperature ``labels[t]`` was sampled at; NaN where unknown) and
    ``trajectory_ids``. Raises ValueError for a window longer than ``seq_len``.
    """
    rows = []
    for b in pack_lengths([len(w) for w in windows], seq_len):
        ws = [windows[i] for i in b]
        seq = build_sequence([(w.input_ids, w.loss_mask, w.rollout_id) for w in ws], seq_len, pad_id)
        adv = np.zeros(seq_len, np.float32)
        lp = np.full(seq_len, np.nan, np.float32)
        temps = np.full(seq_len, np.nan, np.float32)
        s = 0
        for w in ws:
            n = len(w)
            adv[s : s + n] = w.advantage
            lp[s : s + n - 1] = w.rollout_logprobs[1:]
            if w.temperatures is not None:
                temps[s : s + n - 1] = w.temperatures[1:]
            s += n
        rows.append(
            {
                "tokens": seq.tokens,
                "labels": seq.labels,
                "loss_mask": seq.loss_mask,
                "position_ids": seq.position_ids,
                "cu_seqlens": seq.cu_seqlens,
                "advantages": adv,
                "rollout_logprobs": lp,
                "temperatures": temps,
                "trajectory_ids": seq.trajectory_ids,
            }
        )
    return rows

"""Trajectory splitting for SFT: ``RenderedTrajectory`` -> ``ContextPolicy`` -> windows.

The splitting rules live in ``context.py`` (shared with the agent loop); this module feeds whole
trajectories through them and measures the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import CARRIED, NEW, PREFIX, ContextPolicy, ContextState, Window
from klong_megatron.data.render import RenderedTrajectory


def feed(state: ContextState, rt: RenderedTrajectory, upto: int | None = None) -> ContextState:
    """Add messages ``[0, upto)`` of ``rt`` to ``state`` (all by default) and return it."""
    positions = np.arange(len(rt.input_ids))
    for i in range(rt.num_messages if upto is None else upto):
        s, e = rt.spans[i]
        tools = rt.tool_names[i] if rt.tool_names else ()
        state.add(rt.input_ids[s:e], rt.assistant_mask[s:e], positions[s:e], rt.roles[i], rt.pinned[i], tools)
    return state


def split_trajectory(rt: RenderedTrajectory, policy: ContextPolicy) -> list[Window]:
    """All training windows of one trajectory (see ``context.py`` for the invariants)."""
    return feed(policy.start(rt.id), rt).finish()


def context_before(
    rt: RenderedTrajectory, policy: ContextPolicy, message: int, reserve: int | None = None
) -> np.ndarray:
    """The context the model sees before generating message ``message`` (an assistant turn)."""
    return feed(policy.start(rt.id), rt, upto=message).context(reserve)


def boundary_overlap(
    rt: RenderedTrajectory, prev: Window, w: Window, cfg: ContextPolicyConfig, marker_len: int
) -> tuple[int, int]:
    """For consecutive windows: (tokens of ``w`` that ``prev`` showed outside its prefix, counting the markers of
    carried excerpts, and the policy's target
    ``min(max(overlap, carry_tokens), room)``). ``room`` is what ``w`` holds besides its prefix, marker and new
    messages (the observations that open it and the room its first new turn needs)."""
    seen = prev.positions[prev.prefix_len :]
    pos = w.positions[w.positions >= 0]
    shared = int(np.isin(pos, seen[seen >= 0]).sum())
    shared += sum(int((w.positions[s:e] < 0).sum()) for _, kind, s, e in w.segments if kind == CARRIED)  # excerpts
    news = [(m, e - s) for m, kind, s, e in w.segments if kind == NEW]
    k = next((i for i, (m, _) in enumerate(news) if rt.roles[m] == "assistant"), len(news))
    need = max(cfg.gen_reserve, news[k][1]) if k < len(news) else cfg.gen_reserve
    room = cfg.max_len - w.prefix_len - marker_len - sum(n for _, n in news[:k]) - need
    body = sum(e - s for _, kind, s, e in prev.segments if kind != PREFIX)
    return shared, max(0, min(max(cfg.overlap, cfg.carry_tokens or 0), room, body))


@dataclass
class SplitStats:
    trajectories: int = 0
    windows: int = 0
    tokens_total: int = 0
    """tokens of the full renderings"""
    assistant_tokens: int = 0
    window_tokens: int = 0
    """tokens processed: sum of window lengths"""
    trained_tokens: int = 0
    elided_tokens: int = 0
    lower_bound_tokens: int = 0
    """every token the windows show processed once, plus the prefix once more per extra window"""

    def add(self, rt: RenderedTrajectory, windows: list[Window]) -> None:
        self.trajectories += 1
        self.windows += len(windows)
        self.tokens_total += len(rt.input_ids)
        self.assistant_tokens += int(rt.assistant_mask.sum())
        self.window_tokens += sum(len(w) for w in windows)
        self.trained_tokens += sum(int(w.loss_mask.sum()) for w in windows)
        self.elided_tokens += sum(w.elided for w in windows)
        if windows:
            seen = np.unique(np.concatenate([w.positions[w.positions >= 0] for w in windows]))
            self.lower_bound_tokens += len(seen) + sum(w.prefix_len for w in windows[1:])

    @property
    def redundancy(self) -> float:
        """Tokens processed per trained token (1.0 would be no context at all)."""
        return self.window_tokens / max(1, self.trained_tokens)

    @property
    def lower_bound_redundancy(self) -> float:
        return self.lower_bound_tokens / max(1, self.trained_tokens)


def split_all(
    rendered: Iterable[RenderedTrajectory], policy: ContextPolicy, stats: SplitStats | None = None
) -> Iterable[Window]:
    """Split a stream of trajectories, accumulating ``stats``."""
    for rt in rendered:
        windows = split_trajectory(rt, policy)
        if stats is not None:
            stats.add(rt, windows)
        yield from windows

"""Property tests of the ContextPolicy / splitter invariants over random trajectories and budgets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import CARRIED, MARKER, NEW, PREFIX, ContextPolicy
from klong_megatron.data.render import RenderedTrajectory
from klong_megatron.data.split import context_before, split_trajectory

MARK = np.array([1, 2, 3, 4], np.int32)
ELIDE = np.array([5, 6], np.int32)
HEADER, SUFFIX = 3, 1  # synthetic template: 3 header tokens before, 1 token after the generated ones


@st.composite
def trajectories(draw, max_asst: int = 60, max_tool: int = 150) -> RenderedTrajectory:
    roles = (["system"] if draw(st.booleans()) else []) + ["user"]
    for _ in range(draw(st.integers(1, 25))):
        roles.append("assistant")
        roles += ["tool"] * draw(st.integers(0, 2))
        if draw(st.integers(0, 9)) == 0:
            roles.append("user")
    lengths, masks = [], []
    for role in roles:
        if role == "assistant":
            gen = draw(st.integers(1, max_asst))
            lengths.append(HEADER + gen + SUFFIX)
            masks.append(np.r_[np.zeros(HEADER), np.ones(gen), np.zeros(SUFFIX)].astype(np.uint8))
        else:
            n = draw(st.integers(1, max_tool if role == "tool" else 40))
            lengths.append(n)
            masks.append(np.zeros(n, np.uint8))
    n = sum(lengths)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    edges = np.cumsum([0, *lengths])
    pinned_upto = draw(st.sampled_from([0, 0, 2])) if len(roles) > 3 else 0
    return RenderedTrajectory(
        id="t",
        input_ids=rng.integers(10, 500, n).astype(np.int32),
        assistant_mask=np.concatenate(masks),
        spans=np.stack([edges[:-1], edges[1:]], axis=1),
        roles=roles,
        pinned=[i < pinned_upto for i in range(len(roles))],
    )


@st.composite
def policies(draw) -> ContextPolicyConfig:
    max_len = draw(st.integers(120, 600))
    return ContextPolicyConfig(
        max_len=max_len,
        overlap=draw(st.integers(0, 150)),
        prefix_turns=draw(st.integers(0, 2)),
        keep_full_turns=draw(st.sampled_from([None, 0, 1, 3])),
        excerpt_tokens=draw(st.integers(8, 30)),
        gen_reserve=draw(st.sampled_from([0, 0, 20])),
        train_overlap=draw(st.booleans()),
    )


def split(rt: RenderedTrajectory, cfg: ContextPolicyConfig):
    policy = ContextPolicy(cfg, MARK, ELIDE)
    try:
        return policy, split_trajectory(rt, policy)
    except ValueError as e:  # the only refusals: prefix over its cap / no room left after it
        assert "prefix" in str(e) and str(cfg.max_len) in str(e) or "max_prefix_tokens" in str(e)
        assume(False)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(trajectories(), policies())
def test_windows_fit_start_with_prefix_and_map_back(rt: RenderedTrajectory, cfg: ContextPolicyConfig) -> None:
    _, windows = split(rt, cfg)
    assert windows
    prefix = windows[0].input_ids[: windows[0].prefix_len]
    for w in windows:
        assert len(w) <= cfg.max_len
        assert np.array_equal(w.input_ids[: w.prefix_len], prefix)
        real = w.positions >= 0
        assert np.array_equal(w.input_ids[real], rt.input_ids[w.positions[real]])
        assert not w.loss_mask[~real].any(), "markers are never trained"
        assert set(w.loss_mask.tolist()) <= {0, 1}
        assert not (w.loss_mask & (rt.assistant_mask[w.positions] == 0) & real).any()


@SETTINGS
@given(trajectories(), policies())
def test_every_assistant_token_trained_once_or_in_every_window(
    rt: RenderedTrajectory, cfg: ContextPolicyConfig
) -> None:
    _, windows = split(rt, cfg)
    counts = np.zeros(len(rt.input_ids), int)
    present = np.zeros(len(rt.input_ids), int)
    for w in windows:
        real = w.positions >= 0
        np.add.at(counts, w.positions[real], w.loss_mask[real])
        np.add.at(present, w.positions[real], 1)
    lost = sum(w.elided for w in windows)
    asst = rt.assistant_mask == 1
    if cfg.train_overlap:
        trained_where_present = counts[asst] == present[asst]
        assert trained_where_present.all()
        assert (counts[asst] >= 1).sum() == asst.sum() - lost
    else:
        assert counts.max() <= 1
        assert counts[asst].sum() == asst.sum() - lost


@SETTINGS
@given(trajectories(), policies())
def test_messages_are_whole_unless_elided(rt: RenderedTrajectory, cfg: ContextPolicyConfig) -> None:
    _, windows = split(rt, cfg)
    for w in windows:
        for msg, kind, s, e in w.segments:
            if kind == MARKER:
                assert np.array_equal(w.input_ids[s:e], MARK)
                continue
            pos = w.positions[s:e]
            a, b = rt.spans[msg]
            if (pos >= 0).all():
                assert np.array_equal(pos, np.arange(a, b)), f"message {msg} cut without elision"
            else:
                assert kind == CARRIED or e - s < b - a, "only a too-long (or excerpted) message is elided"
                assert np.array_equal(w.input_ids[s:e][pos < 0], ELIDE)


@SETTINGS
@given(trajectories(max_tool=60), policies())
def test_consecutive_windows_overlap_when_budget_allows(rt: RenderedTrajectory, cfg: ContextPolicyConfig) -> None:
    cfg = replace(cfg, keep_full_turns=None)
    _, windows = split(rt, cfg)
    biggest = int(np.diff(rt.spans, axis=1).max())
    for prev, w in zip(windows, windows[1:], strict=False):
        carried = [(m, e - s) for m, kind, s, e in w.segments if kind == CARRIED]
        fits = w.prefix_len + len(MARK) + cfg.overlap + 2 * biggest + cfg.gen_reserve <= cfg.max_len
        if fits:
            assert (
                sum(n for _, n in carried) >= cfg.overlap
                or carried
                and carried[0][0] == len([k for k in prev.segments if k[1] == PREFIX])
            ), "carried context shorter than overlap although it would fit"
        # carried messages come right before the window's first new message
        news = [m for m, kind, _, _ in w.segments if kind == NEW]
        if carried and news:
            assert [m for m, _ in carried] == list(range(news[0] - len(carried), news[0]))


@SETTINGS
@given(trajectories(max_asst=20), policies())
def test_each_window_is_the_context_the_agent_sees(rt: RenderedTrajectory, cfg: ContextPolicyConfig) -> None:
    """Train/inference consistency: before every new assistant turn of a window, the window's tokens
    equal the context ContextState.context() gives the agent at that point of the conversation."""
    longest = max(e - s for (s, e), r in zip(rt.spans, rt.roles, strict=True) if r == "assistant")
    cfg = replace(cfg, gen_reserve=longest)
    policy, windows = split(rt, cfg)
    for w in windows:
        for msg, kind, s, _ in w.segments:
            if kind == NEW and rt.roles[msg] == "assistant":
                assert np.array_equal(context_before(rt, policy, msg), w.input_ids[:s])
    last_asst = max(i for i, r in enumerate(rt.roles) if r == "assistant")
    last = windows[-1]
    start = next(s for m, _, s, _ in last.segments if m == last_asst)
    assert np.array_equal(context_before(rt, policy, last_asst), last.input_ids[:start])


def _rt(lengths: list[int], roles: list[str], pinned: list[bool] | None = None) -> RenderedTrajectory:
    edges = np.cumsum([0, *lengths])
    mask = np.concatenate([np.full(n, r == "assistant", np.uint8) for n, r in zip(lengths, roles, strict=True)])
    return RenderedTrajectory(
        "t",
        np.arange(sum(lengths), dtype=np.int32) % 400 + 10,
        mask,
        np.stack([edges[:-1], edges[1:]], 1),
        roles,
        pinned or [False] * len(roles),
    )


def test_prefix_over_its_cap_is_a_clear_error() -> None:
    rt = _rt([40, 90, 10, 10], ["system", "user", "assistant", "tool"])
    with pytest.raises(ValueError, match=r"pinned prefix .* 130 tokens, more than max_prefix_tokens=100"):
        split_trajectory(rt, ContextPolicy(ContextPolicyConfig(max_len=200, max_prefix_tokens=100), MARK, ELIDE))


def test_pinned_messages_form_the_prefix_and_must_lead() -> None:
    roles = ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    rt = _rt([5, 5, 20, 20, 20, 20, 20], roles, [True, True, True, True, False, False, False])
    windows = split_trajectory(rt, ContextPolicy(ContextPolicyConfig(max_len=100), MARK, ELIDE))
    assert all(w.prefix_len == 50 for w in windows) and len(windows) == 2
    assert windows[0].loss_mask[10:30].all() and not windows[1].loss_mask[10:30].any()
    bad = _rt([5, 5, 20], ["system", "user", "assistant"], [False, True, False])
    with pytest.raises(ValueError, match="message 1 is pinned but message 0 is not"):
        split_trajectory(bad, ContextPolicy(ContextPolicyConfig(max_len=100), MARK, ELIDE))


def test_prefix_turns_extend_the_default_prefix_within_the_cap() -> None:
    roles = ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    rt = _rt([5, 5, 10, 10, 10, 10, 10], roles)
    pol = lambda k, cap=None: ContextPolicy(
        ContextPolicyConfig(max_len=60, prefix_turns=k, max_prefix_tokens=cap), MARK, ELIDE
    )  # noqa: E731
    assert split_trajectory(rt, pol(0))[0].prefix_len == 10
    assert split_trajectory(rt, pol(1))[0].prefix_len == 30
    assert split_trajectory(rt, pol(2, cap=35))[0].prefix_len == 30  # the second turn would pass the cap


def test_progressive_truncation_excerpts_old_tool_outputs_when_carried() -> None:
    roles = ["system", "user"] + ["assistant", "tool"] * 8
    rt = _rt([5, 5] + [10, 60] * 8, roles)
    cfg = ContextPolicyConfig(max_len=200, overlap=150, keep_full_turns=1, excerpt_tokens=12)
    windows = split_trajectory(rt, ContextPolicy(cfg, MARK, ELIDE))
    carried = [(m, e - s) for w in windows[1:] for m, k, s, e in w.segments if k == CARRIED]
    tool_sizes = [n for m, n in carried if rt.roles[m] == "tool"]
    assert 12 in tool_sizes and 60 in tool_sizes  # old outputs cut to excerpts, the latest kept whole

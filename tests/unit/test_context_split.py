"""Property tests of the ContextPolicy / splitter invariants over random trajectories and budgets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import CARRIED, MARKER, NEW, PREFIX, ContextPolicy
from klong_megatron.data.render import RenderedTrajectory
from klong_megatron.data.split import context_before, split_trajectory

MARK = np.array([1, 2, 3, 4], np.int32)
ELIDE = np.array([5, 6], np.int32)
HEADER, SUFFIX = 3, 1  # synthetic template: 3 header tokens before, 1 token after the generated ones


@st.composite
def trajectories(draw, max_asst: int = 60, max_tool: int = 300) -> RenderedTrajectory:
    """Random trajectories; observations reach half a window of the smaller budgets drawn by ``policies``."""
    roles = (["system"] if draw(st.booleans()) else []) + ["user"]
    tools: list[tuple[str, ...]] = [()] * len(roles)
    for _ in range(draw(st.integers(1, 25))):
        roles.append("assistant")
        tools.append((draw(st.sampled_from(["read_file_chunk", "read_file_chunk", "bash", "write_file"])),))
        n = draw(st.integers(0, 2))
        roles += ["tool"] * n
        tools += [()] * n
        if draw(st.integers(0, 9)) == 0:
            roles.append("user")
            tools.append(())
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
        tool_names=tools,
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
        carry_tokens=draw(st.sampled_from([None, None, 100, 300])),
        pin_reading=draw(st.booleans()),
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


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@SETTINGS
@given(trajectories(), policies())
def test_windows_fit_start_with_prefix_and_map_back(rt: RenderedTrajectory, cfg: ContextPolicyConfig) -> None:
    _, windows = split(rt, cfg)
    assert windows
    prefix = windows[0].input_ids[: windows[0].prefix_len]
    for w in windows:
        assert len(w) <= cfg.max_len
        if w.prefix_len != len(prefix):  # pin_reading: the task + reading prefix, from one window on
            assert cfg.pin_reading and w.prefix_len > len(prefix) and w.prefix_len <= cfg.prefix_cap
            assert np.array_equal(w.input_ids[: len(prefix)], prefix)
            prefix = w.input_ids[: w.prefix_len]
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
@given(trajectories(), policies())
def test_every_window_shares_min_overlap_room_with_the_previous(
    rt: RenderedTrajectory, cfg: ContextPolicyConfig
) -> None:
    """Real overlap: carried context from the previous window of at least min(overlap, room) tokens, room being
    what the window holds besides its new messages; the observations that open the window do not count."""
    _, windows = split(rt, cfg)
    for prev, w in zip(windows, windows[1:], strict=False):
        prev_pos = set(prev.positions[prev.prefix_len :][prev.positions[prev.prefix_len :] >= 0].tolist())
        last_prev = max((m for m, kind, _, _ in prev.segments if kind in (CARRIED, NEW)), default=-1)
        if last_prev < 0:  # a prefix-only first window (prefix turns): it shares its whole self, the prefix
            continue
        if w.prefix_len != prev.prefix_len:  # pin_reading: here the pinned reading's tail is the shared context
            assert w.prefix_len > prev.prefix_len and all(m > last_prev for m, kind, _, _ in w.segments if kind == NEW)
            continue
        carried = [(m, s, e) for m, kind, s, e in w.segments if kind == CARRIED]
        assert all(m <= last_prev for m, _, _ in carried), "carried messages come from the previous window"
        for _, s, e in carried:  # ... and are really in it (whole, excerpted or elided: a subset of its tokens)
            assert set(w.positions[s:e][w.positions[s:e] >= 0].tolist()) <= prev_pos
        news = [(m, e - s) for m, kind, s, e in w.segments if kind == NEW]
        k = next(i for i, (m, _) in enumerate(news) if rt.roles[m] == "assistant")
        openers = sum(n for _, n in news[:k])
        room = cfg.max_len - w.prefix_len - len(MARK) - openers - max(cfg.gen_reserve, news[k][1])
        want = min(max(cfg.overlap, cfg.carry_tokens or 0), room)
        shared = sum(e - s for _, s, e in carried)
        prefix_msgs = {m for m, kind, _, _ in w.segments if kind == PREFIX}
        shareable = {m for m, kind, _, _ in prev.segments if kind in (CARRIED, NEW) and m not in prefix_msgs}
        assert shared >= want - len(ELIDE) - 1 or {m for m, _, _ in carried} == shareable, (
            f"window {w.window_index}: {shared} tokens shared, want min(overlap, room) = {want}"
        )
        if carried:  # carried messages are consecutive and come before the window's new ones (openers that
            # find no room at all, next to a turn filling the window, go)
            assert [m for m, _, _ in carried] == list(range(carried[0][0], carried[0][0] + len(carried)))
            assert carried[-1][0] < news[0][0]


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


def test_progressive_truncation_keeps_older_outputs_at_decreasing_fidelity() -> None:
    roles = ["system", "user"] + ["assistant", "tool"] * 12
    rt = _rt([5, 5] + [10, 60] * 12, roles)
    cfg = ContextPolicyConfig(max_len=300, overlap=50, carry_tokens=150, keep_full_turns=1, excerpt_tokens=24)
    windows = split_trajectory(rt, ContextPolicy(cfg, MARK, ELIDE))
    for w in windows[1:]:
        sizes = [e - s for m, k, s, e in w.segments if k == CARRIED and rt.roles[m] == "tool"]  # oldest first
        assert sizes == sorted(sizes), "the older a carried output, the shorter its excerpt"
        assert w.excerpted == sum(n < 60 for n in sizes) and max(sizes) <= 24
    assert all(w.excerpted for w in windows[1:])
    plain = split_trajectory(rt, ContextPolicy(replace(cfg, keep_full_turns=None), MARK, ELIDE))
    assert not any(w.excerpted for w in plain)
    assert len(plain) > len(windows), "excerpts leave more room for new turns"


def test_pin_reading_pins_the_reading_capped_as_head_and_tail() -> None:
    roles = ["system", "user"] + ["assistant", "tool"] * 20
    tools = [()] * 2 + [("read_file_chunk",), ()] * 6 + [("write_file",), ()] + [("bash",), ()] * 13
    rt = _rt([5, 5] + [10, 40] * 20, roles)
    rt.tool_names = tools
    cfg = ContextPolicyConfig(max_len=300, overlap=40, pin_reading=True, max_prefix_tokens=150)
    windows = split_trajectory(rt, ContextPolicy(cfg, MARK, ELIDE))
    pinned = [w for w in windows if w.prefix_len > 10]
    assert pinned and windows[0].prefix_len == 10, "the reading is pinned from the window after it ended"
    for w in pinned:
        msgs = [m for m, k, _, _ in w.segments if k == PREFIX]
        assert msgs[:3] == [0, 1, 2] and msgs[-1] == 13, "task + head and tail of the reading (turns 2..13)"
        assert 140 <= w.prefix_len <= 150 and (w.positions[: w.prefix_len] < 0).any(), "cut with a marker"
        assert all(m > 13 for m, k, _, _ in w.segments if k in (CARRIED, NEW))
    short = split_trajectory(rt, ContextPolicy(replace(cfg, max_prefix_tokens=None, max_len=600), MARK, ELIDE))
    assert [m for m, k, _, _ in short[-1].segments if k == PREFIX] == list(range(14)), "a short reading, whole"

"""Progressive-RL pipeline simulation (benchmarks/rl_pipeline_sim.py): conservation, analytic cases, staleness."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "rl_pipeline_sim.py"
_spec = importlib.util.spec_from_file_location("rl_pipeline_sim", _PATH)
sim = importlib.util.module_from_spec(_spec)
sys.modules["rl_pipeline_sim"] = sim  # dataclasses resolve their module while the class is created
_spec.loader.exec_module(sim)

HOUR = sim.HOUR
# A small pipeline (32 slots, 4 tasks x 4 rollouts per step) so that each simulation takes milliseconds.
SMALL = sim.SimParams(servers=4, slots_per_server=8, tasks_per_iter=4, n=4, iterations=6, judge_workers=4)


def _degenerate(**kw: float) -> sim.SimParams:
    """Every rollout runs into the timeout, on one batch's worth of slots; nothing else takes time unless given."""
    base = dict(
        slots_per_server=4,
        timeout_frac=1.0,
        judge_median_s=0.0,
        train_fixed_s=0.0,
        train_s_per_rollout_hour=0.0,
        sync_s=0.0,
    )
    return dataclasses.replace(SMALL, eval_tasks=0, **{**base, **kw})


@pytest.mark.parametrize("mode", sim.MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_finished_rollout_is_judged_once_and_every_step_trains_one_whole_batch(mode: str, seed: int) -> None:
    p = dataclasses.replace(SMALL, seed=seed, train_fixed_s=40 * 60, max_staleness=1)
    res = sim.simulate(p, mode)
    for r in res.rollouts:
        assert r.judged == (0 if r.aborted else 1), r
        assert (r.end_s is None) == r.aborted
        if r.trained_step is not None:
            assert r.judged == 1 and not r.dropped
    steps = [r.trained_step for r in res.rollouts if r.trained_step is not None]
    assert sorted(set(steps)) == list(range(p.iterations))
    assert all(steps.count(s) == p.batch for s in range(p.iterations))
    for g in {r.group for r in res.rollouts}:  # a group is trained whole, at one step, or not at all
        assert len({r.trained_step for r in res.rollouts if r.group == g}) == 1
    if mode == "sync":
        assert len(res.rollouts) == p.iterations * p.batch and res.dropped_rollouts == 0


def test_sync_servers_never_idle_when_all_rollouts_equal_and_nothing_else_takes_time() -> None:
    res = sim.simulate(_degenerate(), "sync")
    assert res.idle_fraction == pytest.approx(0.0, abs=1e-12)
    assert res.iteration_s == pytest.approx(SMALL.timeout_s)


@pytest.mark.parametrize("train_h", [0.5, 2.0])
def test_sync_idle_fraction_is_train_over_rollout_plus_train_when_rollouts_equal(train_h: float) -> None:
    d, t = SMALL.timeout_s, train_h * HOUR
    res = sim.simulate(_degenerate(train_fixed_s=t), "sync")
    assert res.idle_fraction == pytest.approx(t / (d + t), rel=1e-9)
    assert res.iteration_s == pytest.approx(d + t)


def test_sync_waves_when_the_batch_is_larger_than_the_slots() -> None:
    p = _degenerate(servers=1, slots_per_server=8)  # 16 rollouts per step on 8 slots: two waves per step
    res = sim.simulate(p, "sync")
    assert res.iteration_s == pytest.approx(2 * p.timeout_s)
    assert res.idle_fraction == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cut_by_timeout", [False, True])
def test_partial_idle_fraction_matches_the_analytic_value_when_rollouts_equal(cut_by_timeout: bool) -> None:
    # The next batch generates while the current one trains, so servers idle only while paused for
    # weight sync and during the last step. A rollout that finishes by itself (needs W < timeout of
    # generation) is pushed back by each pause; one cut by the wall-clock timeout D is not, it just
    # generates S less. With I steps, train T and sync S (T + S < W):
    #   finishing itself: end = I*W + I*S + T,   busy = I*W per slot
    #   cut by timeout:   end = I*D + T + S,     busy = I*D - (I-1)*S per slot
    d, w, t, s = SMALL.timeout_s, 0.5 * SMALL.timeout_s, 0.5 * HOUR, 0.25 * HOUR
    shape = dict(timeout_frac=1.0) if cut_by_timeout else dict(timeout_frac=0.0, body_median_frac=0.5, body_sigma=0.0)
    p = _degenerate(train_fixed_s=t, sync_s=s, **shape)
    partial, sync = sim.simulate(p, "partial"), sim.simulate(p, "sync")
    i = p.iterations
    end, busy = (i * d + t + s, i * d - (i - 1) * s) if cut_by_timeout else (i * w + i * s + t, i * w)
    assert partial.end_s == pytest.approx(end)
    assert partial.idle_fraction == pytest.approx(1 - busy / end, rel=1e-9)
    # first batch on-policy; every later batch was started one version before it is trained
    assert partial.staleness == [0] * p.batch + [1] * (i - 1) * p.batch
    assert partial.iteration_s < sync.iteration_s


@settings(max_examples=25, deadline=None)
@given(
    max_staleness=st.integers(0, 3),
    seed=st.integers(0, 10_000),
    train_min=st.floats(0, 240),
    slots_per_server=st.integers(2, 16),
    timeout_frac=st.floats(0, 1),
)
def test_partial_never_trains_a_rollout_staler_than_max_staleness(
    max_staleness: int, seed: int, train_min: float, slots_per_server: int, timeout_frac: float
) -> None:
    p = dataclasses.replace(
        SMALL,
        max_staleness=max_staleness,
        seed=seed,
        train_fixed_s=train_min * 60,
        slots_per_server=slots_per_server,
        timeout_frac=timeout_frac,
    )
    for mode in ("partial", "partial_fifo"):
        res = sim.simulate(p, mode)
        assert res.staleness and max(res.staleness) <= max_staleness
        assert min(res.staleness) >= 0
        assert 0.0 <= res.idle_fraction <= 1.0


def test_partial_with_zero_staleness_trains_only_on_policy_rollouts() -> None:
    res = sim.simulate(dataclasses.replace(SMALL, max_staleness=0), "partial")
    assert set(res.staleness) == {0} and res.dropped_rollouts == 0


@pytest.mark.parametrize("timeout_h", [2.0, 4.0, 6.0])
def test_partial_iteration_time_is_at_most_synchronous_on_the_default_parameters(timeout_h: float) -> None:
    p = sim.SimParams(timeout_s=timeout_h * HOUR)
    sync, partial = sim.simulate(p, "sync"), sim.simulate(p, "partial")
    assert partial.iteration_s <= sync.iteration_s
    assert partial.idle_fraction <= sync.idle_fraction


def test_rollouts_respect_the_timeout_and_generate_their_need_across_weight_sync_pauses() -> None:
    p = dataclasses.replace(SMALL, sync_s=45 * 60, train_fixed_s=30 * 60)
    res = sim.simulate(p, "partial")
    paused_across = 0
    for r in res.rollouts:
        if r.aborted:
            continue
        wall = r.end_s - r.start_s
        assert wall <= p.timeout_s + 1e-6
        assert r.gen_s <= wall + 1e-6
        if not math.isclose(wall, p.timeout_s):  # finished by itself: generated exactly what it needed
            assert r.gen_s == pytest.approx(r.work_s)
        paused_across += wall > r.gen_s + 1
    assert paused_across > 0  # some rollouts really were paused by a weight sync and went on afterwards


def test_priority_queue_lets_eval_jobs_jump_a_loaded_judge() -> None:
    p = dataclasses.replace(SMALL, judge_workers=1, eval_every=1, eval_tasks=4)  # judge-bound
    prio, fifo = sim.simulate(p, "partial"), sim.simulate(p, "partial_fifo")
    assert sim.percentile(prio.eval_waits_s, 0.95) < sim.percentile(fifo.eval_waits_s, 0.95)
    assert len(prio.eval_waits_s) == len(fifo.eval_waits_s) == p.iterations * p.eval_tasks


def test_same_seed_gives_the_same_result_and_another_seed_a_different_one() -> None:
    a, b = sim.simulate(SMALL, "partial"), sim.simulate(SMALL, "partial")
    assert a.rollouts == b.rollouts and a.end_s == b.end_s and a.eval_waits_s == b.eval_waits_s
    c = sim.simulate(dataclasses.replace(SMALL, seed=1), "partial")
    assert c.end_s != a.end_s


def test_percentile_interpolates_between_ranks() -> None:
    assert sim.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert sim.percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)
    assert math.isnan(sim.percentile([], 0.5))


@pytest.mark.parametrize(
    ("field", "value"),
    [("servers", 0), ("n", 0), ("timeout_s", 0.0), ("timeout_frac", 1.5), ("sync_s", -1.0), ("max_staleness", -1)],
)
def test_bad_parameter_is_rejected_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"SimParams\.{field}"):
        sim.SimParams(**{field: value})


def test_unknown_mode_and_bad_stage_list_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        sim.simulate(SMALL, "async")
    with pytest.raises(SystemExit):
        sim.parse_args(["--stages", "2,four"])


def test_command_line_prints_one_table_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    sim.main(["--stages", "1,3", "--iterations", "2", "--servers", "2", "--tasks", "2"])
    out = capsys.readouterr().out
    assert "Stage timeout 1 h" in out and "Stage timeout 3 h" in out
    assert out.count("synchronous") == 2 and "1.00x" in out


def test_refill_servers_idle_only_while_their_rollout_is_judged_in_the_slot() -> None:
    # Every rollout generates the timeout D, then holds its slot while judged for J (the service's rollout
    # function returns a judged trajectory); training and sync take no time, so the buffer never binds:
    # the slots cycle D + J in lockstep and the last step ends at I * (D + J).
    d, j = SMALL.timeout_s, 0.25 * HOUR
    p = _degenerate(judge_median_s=j, judge_sigma=0.0, judge_workers=64, judge_in_slot=True)
    res = sim.simulate(p, "refill")
    assert res.end_s == pytest.approx(p.iterations * (d + j))
    assert res.idle_fraction == pytest.approx(j / (d + j), rel=1e-9)


def test_slot_overhead_holds_the_slot_with_an_idle_server_and_the_timeout_starts_after_it() -> None:
    # Every rollout first holds its slot O seconds off its server (sandbox start), then generates the timeout D;
    # judged beside the slot, instantly: the slots cycle O + D in lockstep and the servers idle O of every cycle.
    d, o = SMALL.timeout_s, 0.1 * HOUR
    p = _degenerate(slot_overhead_s=o)
    res = sim.simulate(p, "refill")
    assert res.end_s == pytest.approx(p.iterations * (o + d))
    assert res.idle_fraction == pytest.approx(o / (o + d), rel=1e-9)
    assert all(r.end_s - r.start_s == pytest.approx(d) for r in res.rollouts)  # the timeout runs from the server


def test_refill_never_starts_more_groups_than_max_ahead_beyond_what_was_taken() -> None:
    # A slow trainer: the buffer bound, not the slots, limits how far the service runs ahead.
    p = dataclasses.replace(SMALL, train_fixed_s=3 * HOUR, max_ahead=5, eval_tasks=0)
    res = sim.simulate(p, "refill")
    starts = sorted(
        {(min(r.start_s for r in res.rollouts if r.group == g), g) for g in {r.group for r in res.rollouts}}
    )
    taken_at = sorted({r.trained_step for r in res.rollouts if r.trained_step is not None})
    assert len(starts) <= p.max_ahead + len(taken_at) * p.tasks_per_iter
    assert res.dropped_rollouts == 0 and max(res.staleness) >= 1  # nothing dropped; stale groups are reported
    busy_first = sum(1 for r in res.rollouts if r.start_s == 0.0)
    assert busy_first == min(p.slots, p.max_ahead * p.n)  # the bound held from the start (20 of 32 slots)

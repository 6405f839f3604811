"""Discrete-event simulation of one progressive-RL stage: synchronous stages vs partial rollouts.

    .venv/bin/python benchmarks/rl_pipeline_sim.py [--stages 2,4,6] [--max-staleness 1] [--seed 0]

Dataflow of one simulated stage (stage timeout = the wall-clock limit of every rollout):
rollout slots (``servers x slots_per_server``) run rollouts of task groups (``n`` per task) ->
each finished rollout is a judge job -> ``judge_workers`` grade jobs (eval jobs from periodic
evaluation rounds compete for the same workers) -> the trainer takes ``tasks_per_iter`` fully
judged groups, trains (time grows with the generated rollout-hours) and pushes weights (rollout
servers paused for ``sync_s``) -> policy version + 1. ``iterations`` training steps per stage.

Modes (same random draws for the k-th launched rollout / judge job in every mode):
- ``sync``: an iteration's rollouts all start at policy version v; the judge starts only when the
  slowest one has finished (whole batch, FIFO with eval jobs); train; sync; next iteration.
- ``partial``: slots are refilled at once; task groups may start up to ``max_staleness`` versions
  ahead of the trainer; a rollout is judged as soon as it finishes, eval jobs first; the trainer
  takes the oldest ``tasks_per_iter`` judged groups; a group that would be trained more than
  ``max_staleness`` versions after its first rollout started is dropped (its running rollouts are
  aborted) and replaced by a new group. In-flight rollouts pause during weight sync and continue
  under the new weights (the partial rollout), so staleness is counted from the start version.
- ``partial_fifo``: ``partial`` with a plain FIFO judge queue (isolates the priority queue).
- ``refill``: the rollout service (``rollout/service.py``, ``rl.refill.enabled``): ``slots`` rollouts run
  whenever the buffer allows; a new group starts while ``started groups - taken < max_ahead``; a rollout's
  slot is refilled when its generation ends and it is judged beside the slots (``judge_in_slot=True``: judged
  inside its slot, its server idling meanwhile, as the first version of the service did); the trainer takes
  the first ``tasks_per_iter`` complete groups in completion order and frees their buffer room after the
  weight sync (``released``); nothing is dropped (staleness is reported; the trainer's token-level filter
  and TIS handle it). ``slot_overhead_s``: a rollout holds its slot that long before its server sees it.

Rollout durations: a fraction ``timeout_frac`` runs into the stage timeout; the rest need a
lognormal amount of generation time (median ``body_median_frac x timeout``), cut at the timeout.
The timeout is wall-clock, so a pause for weight sync shortens a cut rollout's generation.

Limits: one stage at a time (no pipelining across stage boundaries); no server failures, no
retries, no judge errors; train time is linear in rollout-hours; eval rollouts run on separate
servers. Everything is simulated time: no sleeping, deterministic for a seed.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rich.console import Console
from rich.table import Table

Mode = Literal["sync", "partial", "partial_fifo", "refill"]
MODES: tuple[Mode, ...] = ("sync", "partial", "partial_fifo", "refill")
HOUR = 3600.0


@dataclass(frozen=True)
class SimParams:
    """One stage of progressive RL. Times are seconds of simulated time."""

    timeout_s: float = 2 * HOUR
    """Stage timeout: no rollout runs longer (wall clock)."""
    servers: int = 16
    """Rollout servers."""
    slots_per_server: int = 8
    """Concurrent rollouts per server."""
    tasks_per_iter: int = 16
    """Task groups per training step."""
    n: int = 8
    """Rollouts per task (GRPO group size)."""
    iterations: int = 8
    """Training steps simulated in the stage."""
    timeout_frac: float = 0.3
    """Fraction of rollouts that would run past the timeout (mass at the timeout)."""
    body_median_frac: float = 0.4
    """Median generation time of the other rollouts, as a fraction of the timeout."""
    body_sigma: float = 0.6
    """Log-space standard deviation of that generation time."""
    judge_workers: int = 16
    """Concurrent judge jobs."""
    judge_median_s: float = 6 * 60
    """Median grading time of one rollout (0: instant)."""
    judge_sigma: float = 0.5
    """Log-space standard deviation of the grading time."""
    train_fixed_s: float = 5 * 60
    """Fixed cost of one training step."""
    train_s_per_rollout_hour: float = 15.0
    """Training seconds per hour of generation in the batch (windows grow with rollout length)."""
    sync_s: float = 3 * 60
    """Weight sync after each step; rollout servers are paused meanwhile."""
    max_staleness: int = 1
    """Partial modes: a rollout started at version v is trained at a step t only if t - v <= this."""
    eval_every: int = 2
    """An eval round every this many steps (0: none)."""
    eval_tasks: int = 8
    """Eval rollouts per round (on separate eval servers); each becomes an eval-priority judge job."""
    max_ahead: int = 0
    """Refill mode: groups started but not yet taken by the trainer; 0: ceil(slots / n) + 2 x tasks_per_iter
    (rl/batches.py's default)."""
    non_gen_share: float = 0.0
    """Share of a rollout's wall time spent outside generation (tool calls, the agent loop): a rollout needing
    ``w`` s of generation holds its slot ``w / (1 - share)`` s (the stage timeout still cuts it)."""
    slot_overhead_s: float = 0.0
    """Seconds a rollout holds its slot before its server sees it (sandbox start, task files; the workdir export
    and teardown after its last reply are folded in here): the slot is taken, the server idles, the timeout has
    not started."""
    judge_in_slot: bool = False
    """Refill mode: True: a rollout holds its slot while judged (the first version of the service); False (what
    rollout/service.py does): the slot is refilled when generation ends and judging runs beside it."""
    seed: int = 0
    """Seed of every random draw."""

    def __post_init__(self) -> None:
        for name in ("servers", "slots_per_server", "tasks_per_iter", "n", "iterations", "judge_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"SimParams.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "body_median_frac"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SimParams.{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("body_sigma", "judge_median_s", "judge_sigma", "train_fixed_s", "train_s_per_rollout_hour",
                        "slot_overhead_s")  # fmt: skip
        for name in (*non_negative, "sync_s", "max_staleness", "eval_every", "eval_tasks", "max_ahead"):
            if getattr(self, name) < 0:
                raise ValueError(f"SimParams.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.non_gen_share < 1:
            raise ValueError(f"SimParams.non_gen_share must be in [0, 1), got {self.non_gen_share}")
        if not 0 <= self.timeout_frac <= 1:
            raise ValueError(f"SimParams.timeout_frac must be in [0, 1], got {self.timeout_frac}")

    @property
    def slots(self) -> int:
        return self.servers * self.slots_per_server

    @property
    def batch(self) -> int:
        return self.tasks_per_iter * self.n

    @property
    def ahead(self) -> int:
        """Refill mode's buffer bound in groups."""
        return self.max_ahead or -(-self.slots // self.n) + 2 * self.tasks_per_iter


@dataclass
class RolloutRecord:
    """One launched rollout (ids in launch order; times in simulated seconds)."""

    id: int
    group: int
    """Task group (GRPO group) index."""
    version: int
    """Policy version when it started."""
    start_s: float
    work_s: float
    """Generation time it needs to finish by itself (inf: runs into the timeout)."""
    end_s: float | None = None
    """Finish time; None when it was aborted."""
    gen_s: float = 0.0
    """Time it actually generated (wall time minus weight-sync pauses)."""
    judged: int = 0
    """How many times the judge graded it."""
    judge_wait_s: float | None = None
    """Finish -> judge start."""
    trained_step: int | None = None
    """Training step (= policy version being updated) that used it; None if never trained."""
    dropped: bool = False
    """Its group was dropped as too stale."""
    aborted: bool = False
    """Stopped while running because its group was dropped (never judged)."""


@dataclass
class SimResult:
    """Outcome of :func:`simulate`. Idle fraction and iteration time cover [0, end of the last weight sync]."""

    mode: Mode
    params: SimParams
    end_s: float
    busy_slot_s: float
    rollouts: list[RolloutRecord]
    eval_waits_s: list[float]
    dropped_groups: int

    @property
    def iteration_s(self) -> float:
        return self.end_s / self.params.iterations

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_slot_s / (self.params.slots * self.end_s)

    @property
    def judge_waits_s(self) -> list[float]:
        """Rollout finish -> judge start, per judged training rollout (includes waiting for the batch in sync)."""
        return [r.judge_wait_s for r in self.rollouts if r.judge_wait_s is not None]

    @property
    def staleness(self) -> list[int]:
        """Training step minus start version, per trained rollout."""
        return [r.trained_step - r.version for r in self.rollouts if r.trained_step is not None]

    @property
    def dropped_rollouts(self) -> int:
        """Launched rollouts of groups dropped as too stale (finished or aborted)."""
        return sum(r.dropped for r in self.rollouts)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (0..1) of ``xs``; NaN for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class _Stream:
    """The k-th draw of a named random stream, the same in every mode (common random numbers)."""

    def __init__(self, seed: int, name: str, draw: Callable[[random.Random], float]) -> None:
        self._rng = random.Random(f"{seed}:{name}")
        self._draw = draw
        self._xs: list[float] = []

    def __getitem__(self, k: int) -> float:
        while len(self._xs) <= k:
            self._xs.append(self._draw(self._rng))
        return self._xs[k]


def _lognormal(median: float, sigma: float) -> Callable[[random.Random], float]:
    return lambda rng: median * math.exp(sigma * rng.gauss(0.0, 1.0)) if median > 0 else 0.0


def _work(p: SimParams) -> Callable[[random.Random], float]:
    body = _lognormal(p.body_median_frac * p.timeout_s, p.body_sigma)
    return lambda rng: math.inf if rng.random() < p.timeout_frac else body(rng)


def _finish_time(start: float, work: float, timeout: float, pauses: list[tuple[float, float]]) -> float:
    """When a rollout started at ``start`` needing ``work`` s of generation ends, given server pauses."""
    t, left = start, work
    for p0, p1 in pauses:
        if p1 <= t:
            continue
        if p0 >= t + left:
            break
        left -= max(0.0, p0 - t)
        t = p1
    return min(start + timeout, t + left)


def _overlap(a: float, b: float, pauses: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, p1) - max(a, p0)) for p0, p1 in pauses)


@dataclass
class _Group:
    id: int
    version: int
    members: list[int] = field(default_factory=list)
    judged: int = 0
    ready_s: float = 0.0
    state: str = "open"  # open -> ready -> trained, or -> dropped


class _Pipeline:
    """Event-driven state of one simulated stage; handlers are called in (time, submission) order."""

    def __init__(self, p: SimParams, mode: Mode) -> None:
        self.p, self.mode = p, mode
        self.lag = 0 if mode == "sync" else 1 << 30 if mode == "refill" else p.max_staleness
        self.work = _Stream(p.seed, "work", _work(p))
        self.judge_s = _Stream(p.seed, "judge", _lognormal(p.judge_median_s, p.judge_sigma))
        work = _work(p)
        self.eval_rollout_s = _Stream(p.seed, "eval_rollout", lambda rng: min(p.timeout_s, work(rng)))
        self.eval_judge_s = _Stream(p.seed, "eval_judge", _lognormal(p.judge_median_s, p.judge_sigma))
        self.now = self.last = self.busy_slot_s = 0.0
        self.events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self.seq = self.version = self.steps = self.judge_busy = self.dropped_groups = self.eval_jobs = 0
        self.paused = self.training = False
        self.taken = self.judging_in_slot = 0  # refill: groups released by the trainer; slots held by the judge
        self.starting = 0  # slots held by rollouts in their start-up overhead (not yet on a server)
        self.end_s: float | None = None
        self.pauses: list[tuple[float, float]] = []
        self.rollouts: list[RolloutRecord] = []
        self.running: dict[int, int] = {}  # rollout id -> token of its live end event
        self.groups: list[_Group] = []
        self.held: list[int] = []  # sync mode: finished rollouts waiting for the whole batch
        self.judge_q: list[tuple] = []
        self.eval_waits: list[float] = []

    def at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn, args))

    def run(self) -> SimResult:
        self.fill_slots()
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if self.end_s is None and not self.paused:
                self.busy_slot_s += len(self.running) * (t - self.last)
            self.now = self.last = t
            fn(*args)
        assert self.end_s is not None and not self.running
        return SimResult(
            self.mode, self.p, self.end_s, self.busy_slot_s, self.rollouts, self.eval_waits, self.dropped_groups
        )

    # ------------------------------------------------------------------ rollouts

    def fill_slots(self) -> None:
        p = self.p
        if self.mode == "refill":
            credit = self.taken + p.ahead
        else:
            credit = min(self.version + 1 + self.lag, p.iterations) * p.tasks_per_iter + self.dropped_groups
        while (
            not self.paused
            and self.end_s is None
            and len(self.running) + self.starting + self.judging_in_slot < p.slots
        ):
            g = self.groups[-1] if self.groups else None
            if g is None or g.state != "open" or len(g.members) == p.n:
                if len(self.groups) >= credit:
                    return
                g = _Group(len(self.groups), self.version)
                self.groups.append(g)
            r = RolloutRecord(len(self.rollouts), g.id, self.version, self.now, self.work[len(self.rollouts)])
            self.rollouts.append(r)
            g.members.append(r.id)
            if p.slot_overhead_s > 0:
                self.starting += 1
                self.at(self.now + p.slot_overhead_s, self.rollout_start, r.id)
            else:
                self.rollout_start(r.id)

    def rollout_start(self, rid: int) -> None:
        """The rollout reaches its server (after ``slot_overhead_s``): busy from now, timeout from now."""
        r = self.rollouts[rid]
        if self.p.slot_overhead_s > 0:
            self.starting -= 1
            r.start_s = self.now
            if r.dropped:  # its group was dropped while it started
                r.aborted = True
                self.fill_slots()
                return
        self.running[rid] = 0
        self.schedule_end(r)

    def schedule_end(self, r: RolloutRecord) -> None:
        self.running[r.id] += 1
        end = _finish_time(r.start_s, r.work_s / (1 - self.p.non_gen_share), self.p.timeout_s, self.pauses)
        self.at(end, self.rollout_end, r.id, self.running[r.id])

    def rollout_end(self, rid: int, token: int) -> None:
        if self.running.get(rid) != token:
            return  # rescheduled by a pause, or aborted
        del self.running[rid]
        r = self.rollouts[rid]
        r.end_s = self.now
        r.gen_s = self.now - r.start_s - _overlap(r.start_s, self.now, self.pauses)
        if self.mode == "sync":
            self.held.append(rid)
            if len(self.held) == self.p.batch:
                for h in self.held:
                    self.submit(False, h)
                self.held = []
        else:
            self.judging_in_slot += self.mode == "refill" and self.p.judge_in_slot
            self.submit(False, rid)
        self.fill_slots()

    # ------------------------------------------------------------------ judge

    def submit(self, is_eval: bool, ref: int) -> None:
        key = (0 if is_eval else 1,) if self.mode == "partial" else ()
        heapq.heappush(self.judge_q, (*key, self.now, self.seq, is_eval, ref))
        self.seq += 1
        self.dispatch()

    def dispatch(self) -> None:
        while self.judge_busy < self.p.judge_workers and self.judge_q:
            *_, arrived, _, is_eval, ref = heapq.heappop(self.judge_q)
            self.judge_busy += 1
            if is_eval:
                self.eval_waits.append(self.now - arrived)
                self.at(self.now + self.eval_judge_s[ref], self.judge_end, True, ref)
            else:
                r = self.rollouts[ref]
                r.judge_wait_s = self.now - r.end_s
                self.at(self.now + self.judge_s[ref], self.judge_end, False, ref)

    def judge_end(self, is_eval: bool, ref: int) -> None:
        self.judge_busy -= 1
        if not is_eval:
            self.judging_in_slot -= self.mode == "refill" and self.p.judge_in_slot
            r = self.rollouts[ref]
            r.judged += 1
            g = self.groups[r.group]
            g.judged += 1
            if g.state == "open" and g.judged == self.p.n:
                g.state, g.ready_s = "ready", self.now
                self.try_train()
        self.dispatch()
        if self.mode == "refill" and self.p.judge_in_slot and not is_eval:
            self.fill_slots()  # the judged rollout's slot is free

    # ------------------------------------------------------------------ trainer

    def try_train(self) -> None:
        p = self.p
        if self.training or self.steps == p.iterations:
            return
        order = (lambda g: g.ready_s) if self.mode == "refill" else (lambda g: (g.version, g.ready_s))  # log order
        ready = sorted((g for g in self.groups if g.state == "ready"), key=order)
        if len(ready) < p.tasks_per_iter:
            return
        gen_s = 0.0
        for g in ready[: p.tasks_per_iter]:
            assert self.version - g.version <= self.lag, "stale group should have been dropped"
            g.state = "trained"
            for rid in g.members:
                assert self.rollouts[rid].trained_step is None, "rollout trained twice"
                self.rollouts[rid].trained_step = self.version
                gen_s += self.rollouts[rid].gen_s
        self.training = True
        self.at(self.now + p.train_fixed_s + p.train_s_per_rollout_hour * gen_s / HOUR, self.train_end)

    def train_end(self) -> None:
        self.paused = True
        self.pauses.append((self.now, self.now + self.p.sync_s))
        for rid in list(self.running):
            self.schedule_end(self.rollouts[rid])
        self.at(self.now + self.p.sync_s, self.sync_end)

    def sync_end(self) -> None:
        p = self.p
        self.paused = self.training = False
        self.version += 1
        self.steps += 1
        self.taken += p.tasks_per_iter if self.mode == "refill" else 0
        if self.steps == p.iterations:
            self.end_s = self.now
        for g in self.groups:
            if g.state in ("open", "ready") and self.version - g.version > self.lag:
                self.drop(g)
        if p.eval_every and self.version % p.eval_every == 0:
            for _ in range(p.eval_tasks):
                self.at(self.now + self.eval_rollout_s[self.eval_jobs], self.submit, True, self.eval_jobs)
                self.eval_jobs += 1
        self.fill_slots()
        self.try_train()

    def drop(self, g: _Group) -> None:
        """Too stale to be trained: abort its running rollouts; a replacement group gets its credit."""
        g.state = "dropped"
        self.dropped_groups += 1
        for rid in g.members:
            r = self.rollouts[rid]
            r.dropped = True
            if rid in self.running:
                del self.running[rid]
                r.aborted = True
                r.gen_s = self.now - r.start_s - _overlap(r.start_s, self.now, self.pauses)


def simulate(params: SimParams, mode: Mode) -> SimResult:
    """Simulate ``params.iterations`` training steps of one stage in ``mode`` (see the module docstring).

    Deterministic for ``params.seed``; the k-th launched rollout gets the same generation need and
    judge time in every mode. Runs until every finished rollout and eval job has been judged.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _Pipeline(params, mode).run()


# ---------------------------------------------------------------------- command line

MODE_NAMES = {
    "sync": "synchronous",
    "partial": "partial + priority judge",
    "partial_fifo": "partial + FIFO judge",
    "refill": "refill (rollout service)",
}


def _hours_list(text: str) -> list[float]:
    try:
        hours = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stages wants comma-separated hours like 2,4,6, got {text!r}") from None
    if not hours or any(h <= 0 for h in hours):
        raise argparse.ArgumentTypeError(f"--stages hours must be > 0, got {text!r}")
    return hours


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SimParams()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = ap.add_argument
    add("--stages", type=_hours_list, default=[2.0, 4.0, 6.0], help="stage timeouts in hours (default 2,4,6)")
    add("--servers", type=int, default=d.servers, help="rollout servers")
    add("--slots-per-server", type=int, default=d.slots_per_server, help="concurrent rollouts per server")
    add("--tasks", type=int, default=d.tasks_per_iter, help="task groups per training step")
    add("--n", type=int, default=d.n, help="rollouts per task")
    add("--iterations", type=int, default=d.iterations, help="training steps per stage")
    add("--timeout-frac", type=float, default=d.timeout_frac, help="fraction of rollouts cut by the timeout")
    add("--body-median-frac", type=float, default=d.body_median_frac, help="median of the rest / timeout")
    add("--body-sigma", type=float, default=d.body_sigma, help="lognormal sigma of the rest")
    add("--judge-workers", type=int, default=d.judge_workers, help="concurrent judge jobs")
    add("--judge-median-min", type=float, default=d.judge_median_s / 60, help="median grading time (min)")
    add("--judge-sigma", type=float, default=d.judge_sigma, help="lognormal sigma of the grading time")
    add("--train-fixed-min", type=float, default=d.train_fixed_s / 60, help="fixed cost per step (min)")
    add("--train-s-per-rollout-hour", type=float, default=d.train_s_per_rollout_hour, help="train s per rollout-hour")
    add("--sync-min", type=float, default=d.sync_s / 60, help="weight sync, servers paused (min)")
    add("--max-staleness", type=int, default=d.max_staleness, help="partial modes: max policy-version lag")
    add("--eval-every", type=int, default=d.eval_every, help="eval round every k steps (0: none)")
    add("--eval-tasks", type=int, default=d.eval_tasks, help="eval judge jobs per round")
    add("--max-ahead", type=int, default=d.max_ahead, help="refill: groups ahead of the trainer (0: default)")
    add("--seed", type=int, default=d.seed)
    return ap.parse_args(argv)


def params_for_stage(args: argparse.Namespace, timeout_h: float) -> SimParams:
    """The :class:`SimParams` of one stage from the command-line arguments (minutes/hours -> seconds)."""
    return SimParams(
        timeout_s=timeout_h * HOUR,
        servers=args.servers,
        slots_per_server=args.slots_per_server,
        tasks_per_iter=args.tasks,
        n=args.n,
        iterations=args.iterations,
        timeout_frac=args.timeout_frac,
        body_median_frac=args.body_median_frac,
        body_sigma=args.body_sigma,
        judge_workers=args.judge_workers,
        judge_median_s=args.judge_median_min * 60,
        judge_sigma=args.judge_sigma,
        train_fixed_s=args.train_fixed_min * 60,
        train_s_per_rollout_hour=args.train_s_per_rollout_hour,
        sync_s=args.sync_min * 60,
        max_staleness=args.max_staleness,
        eval_every=args.eval_every,
        eval_tasks=args.eval_tasks,
        max_ahead=args.max_ahead,
        seed=args.seed,
    )


def stage_table(timeout_h: float, results: list[SimResult]) -> Table:
    """One rich table: a row per mode; speed-up is synchronous iteration time / this mode's."""
    p = results[0].params
    base = next(r for r in results if r.mode == "sync").iteration_s
    t = Table(
        title=f"Stage timeout {timeout_h:g} h: {p.iterations} steps x {p.tasks_per_iter} tasks x {p.n} rollouts, "
        f"{p.slots} slots, {p.judge_workers} judge workers, max staleness {p.max_staleness}"
    )
    t.add_column("mode", no_wrap=True)
    for col in (
        "iteration\ntime (h)",
        "rollout-server\nidle",
        "judge wait\np50 / p95 (min)",
        "eval judge\nwait p95 (min)",
        "mean\nstaleness",
        "dropped stale\nrollouts",
        "speed-up\nvs sync",
    ):
        t.add_column(col, justify="right", no_wrap=True)
    for r in results:
        w = r.judge_waits_s
        t.add_row(
            MODE_NAMES[r.mode],
            f"{r.iteration_s / HOUR:.2f}",
            f"{r.idle_fraction:.1%}",
            f"{percentile(w, 0.5) / 60:.1f} / {percentile(w, 0.95) / 60:.1f}",
            f"{percentile(r.eval_waits_s, 0.95) / 60:.1f}" if r.eval_waits_s else "-",
            f"{statistics.fmean(r.staleness):.2f}",
            str(r.dropped_rollouts),
            f"{base / r.iteration_s:.2f}x",
        )
    return t


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=140)
    for hours in args.stages:
        try:
            params = params_for_stage(args, hours)
        except ValueError as e:
            raise SystemExit(f"bad argument: {e}") from None
        console.print(stage_table(hours, [simulate(params, m) for m in MODES]))


if __name__ == "__main__":
    main()

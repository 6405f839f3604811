"""Calibrate rl_pipeline_sim.py's ``refill`` mode on the real rollout service, then simulate KLong scale.

Measured run (scaled down, wall clock): the real ``RolloutService`` (rollout/service.py) runs the real
``AgentLoop`` + ``ToolSet`` through the real ``SGLangEngine`` HTTP client against ``LatencyEngineServer``, an
engine double speaking SGLang's ``/generate`` (the dev server's protocol, rollout/devserver.py) whose replies
take drawn latencies: rollout k needs ``work[k]`` seconds of generation, drawn exactly as the simulator draws
them (a share ``timeout_frac`` runs into the stage timeout, the rest lognormal) from the simulator's own random
stream, spent in turns of lognormal length; when the need is met the double answers a ``submit`` call. Tools run
in ``MemorySandbox`` (instant). The trainer side does what ``rl/batches.py:RefillBatches`` does with the group
log (take the first ``tasks`` complete groups after ``taken``, report ``taken`` after the update) with a timed
update in place of the Megatron step: ``train_s`` of training, then ``sync_s`` of weight sync during which the
double pauses generation (as ``/pause_generation`` in_place does). Idle share = 1 - slot-seconds holding a
rollout outside the weight-sync pauses (the simulator's definition: a server with a request in flight or a
rollout between turns is in use) / (concurrency x time to the last sync's end); iteration time = that time /
steps. The share of a rollout's time outside generation (agent loop, HTTP; tens of percent on a loaded machine)
is measured by the double and given to the simulator (``non_gen_share``); everything else is the same settings.

The simulator gets the same settings (slots = concurrency, judge instant, train time fixed) and predicts both.
Then ``--klong`` prints the simulated idle share with and without refill at KLong scale.

``--real-trainer``: the trainer is ``klong-rl`` itself (a subprocess: experiment=rl_demo, no SFT, refill on, one
stage of these settings, disk weight sync, in_place pauses, zero-variance groups kept so every update trains)
with its in-process service, bwrap sandboxes and check-command judge, against ``TrainerEngineServer`` (the
double plus the weight-push routes; replies in the run's demo_bpe tokens). Measured from the double: idle share
and iteration time from the first request to the end of the ``--iterations``-th push; from the run's printed
metrics: update time (iteration_s - refill/wait_s - the push pause), judge latency, rollout wall time (the
simulator's non_gen_share = 1 - generation / the agent's rollout time). The run is stopped there (before its
stage-end evaluation). Limit: the double tells rollouts apart by their context; a context cut by the context
policy starts a new rollout there (``rollouts started`` shows it).

    python benchmarks/refill_calibration.py [--concurrency 16] [--n 4] [--tasks 4] [--timeout 4] [--klong]
    python benchmarks/refill_calibration.py --real-trainer --concurrency 8 --n 4 --tasks 2 --iterations 10 \
        --timeout 8 --turn 1 --sync 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rl_pipeline_sim as sim  # noqa: E402
from rollout_service_load import MemorySandbox  # noqa: E402

from klong_megatron.config.data import ContextPolicyConfig  # noqa: E402
from klong_megatron.config.rollout import RolloutConfig, SamplingConfig  # noqa: E402
from klong_megatron.data.context import ContextPolicy  # noqa: E402
from klong_megatron.data.render import Renderer, load_tokenizer  # noqa: E402
from klong_megatron.data.trajectory import Message  # noqa: E402
from klong_megatron.rollout.agent import AgentLoop  # noqa: E402
from klong_megatron.rollout.manager import RolloutTask  # noqa: E402
from klong_megatron.rollout.service import RolloutService, read_group_log  # noqa: E402
from klong_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from klong_megatron.rollout.toolcalls import format_hermes  # noqa: E402
from klong_megatron.sandbox.tools import ToolSet  # noqa: E402


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hit its stage timeout and left
            super().handle_error(request, client_address)


class LatencyEngineServer:
    """SGLang ``/generate`` double with drawn latencies (see the module docstring); thread-safe counters."""

    def __init__(self, p: sim.SimParams, prompt_len: int, turn_s: float, tokenize: Any, eot: int) -> None:
        self.p, self.prompt_len, self.turn_s = p, prompt_len, turn_s
        self.work = sim._Stream(p.seed, "work", sim._work(p))  # the simulator's draws, in launch order
        self.turn_rng = random.Random(f"{p.seed}:turn")
        step = "Next step.\n" + format_hermes("bash", {"command": "make"})
        self.step_ids = tokenize(step) + [eot]
        self.submit_ids = tokenize(format_hermes("submit", {"summary": "done"})) + [eot]
        self.rollouts: dict[tuple[int, ...], list[float]] = {}  # prompt -> [need left, start, last reply, generated]
        self.gen_s = self.gap_s = 0.0  # generation served; time between a reply and the rollout's next request
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.http = _QuietServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def pause(self, on: bool) -> None:
        (self.paused.set if on else self.paused.clear)()

    def _key(self, input_ids: list[int]) -> tuple[Any, ...]:
        """The rollout a request belongs to (called under ``lock``): here its prompt (unique per rollout)."""
        return tuple(input_ids[: self.prompt_len])

    def _replied(self, key: tuple[Any, ...], context: list[int], finished: bool) -> None:
        """Called under ``lock`` after each reply: ``context`` = request + reply; ``finished``: the last one."""

    def _turn(self, input_ids: list[int]) -> list[int]:
        with self.lock:
            key = self._key(input_ids)
            now = time.monotonic()
            if key not in self.rollouts:
                self.rollouts[key] = [self.work[len(self.rollouts)], now, now, 0.0]
            left, start, last_reply, _ = self.rollouts[key]
            self.gap_s += now - last_reply
            turn = self.turn_s * math.exp(0.3 * self.turn_rng.gauss(0.0, 1.0))
            span = min(turn, left, start + self.p.timeout_s - time.monotonic())
        done, last = 0.0, time.monotonic()
        while done < span:  # generation time (measured, not assumed: sleeps overrun on a loaded machine)
            time.sleep(min(0.005, span - done))
            now = time.monotonic()
            if not self.paused.is_set():  # a weight-sync pause stops the clock
                dt = min(now - last, span - done)
                done += dt
                with self.lock:
                    self.gen_s += dt
            last = now
        with self.lock:
            self.rollouts[key][0] = left - span
            self.rollouts[key][3] += span
            self.rollouts[key][2] = now = time.monotonic()
            ids = self.submit_ids if left - span <= 1e-9 else self.step_ids
            self._replied(key, input_ids + ids, left - span <= 1e-9 or now >= start + self.p.timeout_s - 0.01)
        return ids

    version = "0"

    def route(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """(status, JSON reply) of one request; ``body`` None for a GET."""
        if path != "/generate" or body is None:
            return 404, {"error": f"no route {path}"}
        ids = self._turn(body["input_ids"])
        meta = {"id": body.get("rid"), "finish_reason": {"type": "stop", "matched": ids[-1]},
                "prompt_tokens": len(body["input_ids"]), "completion_tokens": len(ids), "weight_version": self.version,
                "output_token_logprobs": [[-0.1, t, None] for t in ids]}  # fmt: skip
        return 200, {"text": "", "output_ids": ids, "meta_info": meta}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None: ...

            def do_POST(self) -> None:
                self._send(*server.route(self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))

            def do_GET(self) -> None:
                self._send(*server.route(self.path, None))

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client hit its stage timeout and left
                    pass

        return Handler


async def measured_run(p: sim.SimParams, turn_s: float, out: Path) -> dict[str, float]:
    """One scaled stage on the real service; returns iteration time (s), idle share, rollouts started."""
    tok = load_tokenizer("byte")
    renderer = Renderer(tok)
    policy = ContextPolicy.from_renderer(ContextPolicyConfig(max_len=16384, overlap=256, gen_reserve=160), renderer)
    system = Message("system", "You are an agent. Tools: bash, submit.", pinned=True)

    def prompt(g: int, k: int) -> list[Message]:
        return [system, Message("user", f"Task {g:06d} attempt {k:03d}.", pinned=True)]

    schemas = ToolSet(MemorySandbox()).schemas()  # the agent renders its prompt with the tool schemas
    prompt_len = len(renderer.render(prompt(0, 0), "x", tools=schemas).input_ids)
    double = LatencyEngineServer(p, prompt_len, turn_s, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                                 renderer.eot_id)  # fmt: skip
    engine = SGLangEngine([double.url], max_inflight=p.slots + 8, request_timeout_s=p.timeout_s + 60)
    cfg = RolloutConfig(sampling=SamplingConfig(max_new_tokens=128), max_turns=10_000, timeout_s=p.timeout_s)
    agent = AgentLoop(engine, renderer, policy, cfg)

    def groups_of(stage: int, index: int) -> list[RolloutTask]:
        return [RolloutTask(f"g{index:06d}", prompt(index, k), sample=k) for k in range(p.n)]

    def rollout_fn_of(stage: int) -> Any:
        async def rollout(task: RolloutTask) -> Any:
            return await agent.run(task, ToolSet(MemorySandbox()))

        return rollout

    svc = RolloutService(out, groups_of, rollout_fn_of, concurrency=p.slots, max_ahead=p.ahead)
    t0 = time.monotonic()
    await svc.start()
    taken, held = 0, [0.0]  # slot-seconds holding a rollout outside weight-sync pauses (the simulator's "busy")

    async def count_held() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            if not double.paused.is_set():
                held[0] += svc.status()["running"] * (now - last)
            last = now

    counter = asyncio.create_task(count_held())
    for _ in range(p.iterations):
        while True:  # RefillBatches.take: the first `tasks` complete groups after `taken`
            entries = read_group_log(out / "groups.jsonl", taken)
            if len(entries) >= p.tasks_per_iter:
                break
            await asyncio.sleep(0.005)
        taken += p.tasks_per_iter
        await asyncio.sleep(p.train_fixed_s)  # the update (a Megatron step in the real trainer)
        double.pause(True)
        await asyncio.sleep(p.sync_s)  # the weight push pauses generation
        double.pause(False)
        await svc.control(taken=taken)  # RefillBatches.released
    total = time.monotonic() - t0
    busy = held[0]
    counter.cancel()
    await svc.close()
    await engine.close()
    double.http.shutdown()
    return {"iteration_s": total / p.iterations, "idle": 1 - busy / (p.slots * total), "rollouts": len(double.rollouts),
            "non_gen_share": double.gap_s / (double.gap_s + double.gen_s)}  # fmt: skip


class TrainerEngineServer(LatencyEngineServer):
    """The double ``klong-rl`` itself runs against (``--real-trainer``). ``/generate`` as above, but the samples
    of a group share a prompt, so a request continues a rollout whose last context (request + reply) it
    extends; plus what ``SGLangEngine`` calls around a disk weight push (rollout/sglang.py ``update_weights``,
    replies shaped like rollout/devserver.py's): ``/pause_generation`` stops every generation clock (SGLang's
    in_place pause), ``/update_weights_from_disk`` takes ``load_s`` and records the version, ``/continue_generation``
    resumes, ``/model_info`` reports the version. Slot use is counted while no pause holds (as above)."""

    def __init__(self, p: sim.SimParams, turn_s: float, tokenize: Any, eot: int, load_s: float) -> None:
        self.contexts: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}  # context after a reply -> rollouts
        self.live: set[tuple[Any, ...]] = set()  # rollouts between their first request and their last reply
        self.load_s, self.first_s, self.held_s = load_s, 0.0, 0.0
        self.done_gen: list[float] = []  # generation time of each finished rollout
        self.inflight: set[tuple[Any, ...]] = set()  # rollouts with a request being answered
        self.syncs: list[tuple[float, float, float, str]] = []  # pause start, end, held slot-s at the end, version
        super().__init__(p, 0, turn_s, tokenize, eot)
        threading.Thread(target=self._count, daemon=True).start()

    def _key(self, input_ids: list[int]) -> tuple[Any, ...]:
        for ctx, keys in self.contexts.items():  # the samples of a group may share a context: any one of them
            if len(ctx) <= len(input_ids) and tuple(input_ids[: len(ctx)]) == ctx:
                if len(keys) == 1:
                    del self.contexts[ctx]
                self.inflight.add(keys[0])
                return keys.pop(0)
        key = ("rollout", len(self.rollouts))
        self.live.add(key)
        self.inflight.add(key)
        self.first_s = self.first_s or time.monotonic()
        return key

    def _replied(self, key: tuple[Any, ...], context: list[int], finished: bool) -> None:
        self.inflight.discard(key)
        if finished:
            self.live.discard(key)
            self.done_gen.append(self.rollouts[key][3])
        else:
            self.contexts.setdefault(tuple(context), []).append(key)

    def _count(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(0.01)
            now = time.monotonic()
            with self.lock:
                if self.first_s and not self.paused.is_set():
                    self.held_s += len(self.live) * (now - last)
                for key in [k for k in self.live if k not in self.inflight]:  # the agent's own timeout ended it
                    if now > self.rollouts[key][1] + self.p.timeout_s:
                        self.live.discard(key)
                        self.done_gen.append(self.rollouts[key][3])
            last = now

    def route(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if path == "/pause_generation":
            self.pause(True)
            self.pause_s = time.monotonic()
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/update_weights_from_disk":
            time.sleep(self.load_s)  # a server loading the exported weights
            self.version = str((body or {}).get("weight_version", self.version))
            return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
        if path == "/continue_generation":
            with self.lock:
                self.pause(False)
                self.syncs.append((self.pause_s, time.monotonic(), self.held_s, self.version))
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path in ("/model_info", "/get_model_info"):
            return 200, {"model_path": "double", "is_generation": True, "weight_version": self.version}
        if path in ("/health_generate", "/health", "/flush_cache"):
            return 200, {"status": "ok"}
        return super().route(path, body)


def _metric_lines(text: str) -> list[dict[str, float]]:
    """The ``rl/stage0 step N  key value  ...`` lines ``klong-rl`` prints (klong_megatron/logging.py)."""
    rows = []
    for line in text.splitlines():
        if m := re.match(r"rl/stage\d+ step +\d+ (.*)$", line):
            pairs = re.findall(r"(\S+) (-?[\d.,]+)%?(?= |$)", m[1])
            rows.append({k: float(v.replace(",", "")) for k, v in pairs})
    return rows


def trainer_run(args: argparse.Namespace, p: sim.SimParams, out: Path) -> dict[str, Any]:
    """``klong-rl`` (experiment=rl_demo, refill, disk weight sync) against a ``TrainerEngineServer``: returns the
    double's iteration time and idle share to the last push's end and the run's mean update / push times."""
    tok = load_tokenizer("demo_bpe")
    double = TrainerEngineServer(p, args.turn, lambda s: tok(s, add_special_tokens=False)["input_ids"],
                                 Renderer(tok).eot_id, args.sync)  # fmt: skip
    stage = (f"[{{timeout_s: {p.timeout_s}, iterations: {p.iterations}, rollouts_per_task: {p.n}, "
             f"tasks_per_iteration: {p.tasks_per_iter}}}]")  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "klong-rl"), "experiment=rl_demo", f"output_dir={out}",
           "rl.sft_warmup=null", "rl.refill.enabled=true", "rl.refill.poll_s=0.05", "rl.weight_sync=disk",
           "rollout.engine=sglang", f"rollout.servers=[{double.url}]", "rollout.weight_pause_mode=in_place",
           f"rollout.concurrency={p.slots}", "rollout.max_turns=1000", "algo.filter_zero_variance=false",
           "rl.health.action=warn", f"stages={stage}", "logger.backend=console"]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    log = out / "klong-rl.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:  # the run goes on to the stage's held-out evaluation: stop it once every update has logged
            while proc.poll() is None and len(_metric_lines(log.read_text())) < p.iterations:
                time.sleep(0.2)
        finally:  # its whole session: the Megatron worker and the sandboxes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    rows = _metric_lines(log.read_text())
    syncs = [s for s in double.syncs if s[3] != "0"]  # version 0: the push at start-up, before any rollout
    if len(rows) < p.iterations or len(syncs) < p.iterations:
        raise SystemExit(f"klong-rl stopped after {len(rows)} updates ({len(syncs)} pushes); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))  # fmt: skip
    end, held = syncs[p.iterations - 1][1:3]
    total = end - double.first_s
    sync = sum(s[1] - s[0] for s in syncs[: p.iterations]) / p.iterations
    update = sum(r["iteration_s"] - r.get("refill/wait_s", 0.0) for r in rows) / len(rows) - sync
    wall = sum(r["rollout_wall_s"] for r in rows) / len(rows)  # the agent's own clock, in the slot until judged
    judge = sorted(r.get("judge_queue/latency_train_p50", 0.0) for r in rows)[len(rows) // 2]
    train = sum(r.get("train_s", 0.0) for r in rows) / len(rows)
    gen = sum(double.done_gen) / len(double.done_gen)  # generation of a finished rollout at the double
    return {"iteration_s": total / p.iterations, "idle": 1 - held / (p.slots * total), "update_s": update,
            "sync_s": sync, "train_s": train, "judge_s": judge, "wall_s": wall, "rollouts": len(double.rollouts),
            "non_gen_share": 1 - gen / wall, "server_non_gen": double.gap_s / (double.gap_s + double.gen_s),
            }  # fmt: skip


def calibration_params(args: argparse.Namespace) -> sim.SimParams:
    return sim.SimParams(
        timeout_s=args.timeout, servers=1, slots_per_server=args.concurrency, tasks_per_iter=args.tasks, n=args.n,
        iterations=args.iterations, judge_workers=args.concurrency, judge_median_s=0.0, train_fixed_s=args.train,
        train_s_per_rollout_hour=0.0, sync_s=args.sync, eval_every=0, seed=args.seed,
    )  # fmt: skip


def klong_table() -> Table:
    """Simulated idle share at KLong scale: 64 rollout servers x 16 slots = 1,024 concurrent rollouts."""
    t = Table(title="KLong scale (simulated): 64 servers x 16 slots = 1,024 concurrent, 128 tasks x 8 per step")
    for col in ("stage timeout", "mode", "iteration h", "rollout-server idle", "mean staleness", "speed-up"):
        t.add_column(col, justify="right")
    for hours in (2, 4, 6):
        p = sim.SimParams(timeout_s=hours * sim.HOUR, servers=64, slots_per_server=16, tasks_per_iter=128, n=8,
                          iterations=8, judge_workers=128, train_s_per_rollout_hour=1.0, eval_every=0)  # fmt: skip
        res = {m: sim.simulate(p, m) for m in ("sync", "partial", "refill")}
        res["refill_judge_aside"] = sim.simulate(dataclasses.replace(p, judge_in_slot=False), "refill")
        for m, r in res.items():
            speed = res["sync"].iteration_s / r.iteration_s
            name = sim.MODE_NAMES.get(m, "refill, judged beside the slot")
            t.add_row(f"{hours} h", name, f"{r.iteration_s / sim.HOUR:.2f}", f"{r.idle_fraction:.1%}",
                      f"{sum(r.staleness) / len(r.staleness):.2f}", f"{speed:.2f}x")  # fmt: skip
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="rollouts per group")
    ap.add_argument("--tasks", type=int, default=4, help="groups per update")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=4.0, help="stage timeout (s), scaled down from hours")
    ap.add_argument("--turn", type=float, default=0.25, help="median turn latency (s)")
    ap.add_argument("--train", type=float, default=1.5, help="update time (s)")
    ap.add_argument("--sync", type=float, default=0.4, help="weight sync pause (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--klong", action="store_true", help="also print the KLong-scale simulation")
    ap.add_argument("--real-trainer", action="store_true", help="klong-rl (rl_demo, refill) as the trainer; "
                    "--sync: the double's weight-load time (update and push times are measured)")  # fmt: skip
    ap.add_argument("--out", help="--real-trainer: keep klong-rl's output directory (and its log) here")
    args = ap.parse_args()
    p = calibration_params(args)
    with tempfile.TemporaryDirectory() as tmp:
        d = args.out or tmp
        if args.real_trainer:
            measured = trainer_run(args, p, Path(d))
            p = dataclasses.replace(p, train_fixed_s=measured["update_s"], sync_s=measured["sync_s"],
                                    judge_median_s=measured["judge_s"])  # fmt: skip
        else:
            measured = asyncio.run(measured_run(p, args.turn, Path(d)))
    # the simulator's rollouts hold their slots as long as the measured ones: generation + the measured rest
    predicted = sim.simulate(dataclasses.replace(p, non_gen_share=measured["non_gen_share"]), "refill")
    t = Table(
        title=f"refill calibration: {p.slots} concurrent, {p.tasks_per_iter} x {p.n} per update, timeout "
        f"{p.timeout_s:g} s, train {p.train_fixed_s:g} s, sync {p.sync_s:g} s, {p.iterations} updates"
    )
    for col in ("", "iteration s", "rollout-server idle"):
        t.add_column(col, justify="right")
    who = "klong-rl + service + agent + HTTP" if args.real_trainer else "service + agent + HTTP"
    t.add_row(f"measured ({who})", f"{measured['iteration_s']:.2f}", f"{measured['idle']:.1%}")
    t.add_row("simulated (rl_pipeline_sim refill)", f"{predicted.iteration_s:.2f}", f"{predicted.idle_fraction:.1%}")
    err_it = predicted.iteration_s / measured["iteration_s"] - 1
    err_idle = predicted.idle_fraction / measured["idle"] - 1 if measured["idle"] > 0 else math.nan
    t.add_row("sim / measured - 1", f"{err_it:+.1%}", f"{err_idle:+.1%}")
    if args.real_trainer:  # the double sees a rollout from its first request to its last reply only
        seen = sim.simulate(dataclasses.replace(p, non_gen_share=measured["server_non_gen"]), "refill")
        t.add_row("simulated, rollouts as long as the double sees them", f"{seen.iteration_s:.2f}",
                  f"{seen.idle_fraction:.1%}")  # fmt: skip
        t.add_row("sim / measured - 1", f"{seen.iteration_s / measured['iteration_s'] - 1:+.1%}",
                  f"{seen.idle_fraction / measured['idle'] - 1:+.1%}" if measured["idle"] > 0 else "nan")  # fmt: skip
    console = Console(width=140)
    console.print(t)
    console.print(
        f"rollouts started: measured {measured['rollouts']}, simulated {len(predicted.rollouts)}; share of rollout "
        f"time outside generation (agent loop, HTTP), measured and given to the simulator: "
        f"{measured['non_gen_share']:.1%}"
    )
    if args.real_trainer:
        console.print(f"klong-rl per update: {measured['update_s']:.2f} s from the taken groups to the push "
                      f"(train_s {measured['train_s']:.2f} s), weight push pause {measured['sync_s']:.2f} s: "
                      "given to the simulator as train and sync time")  # fmt: skip
    if args.klong:
        console.print(klong_table())


if __name__ == "__main__":
    main()

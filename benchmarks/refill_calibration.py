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

    python benchmarks/refill_calibration.py [--concurrency 16] [--n 4] [--tasks 4] [--timeout 4] [--klong]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
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
        self.rollouts: dict[tuple[int, ...], list[float]] = {}  # prompt -> [need left, start, last reply]
        self.gen_s = self.gap_s = 0.0  # generation served; time between a reply and the rollout's next request
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.http = _QuietServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def pause(self, on: bool) -> None:
        (self.paused.set if on else self.paused.clear)()

    def _turn(self, input_ids: list[int]) -> list[int]:
        key = tuple(input_ids[: self.prompt_len])
        with self.lock:
            now = time.monotonic()
            if key not in self.rollouts:
                self.rollouts[key] = [self.work[len(self.rollouts)], now, now]
            left, start, last_reply = self.rollouts[key]
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
            self.rollouts[key][2] = time.monotonic()
        return self.submit_ids if left - span <= 1e-9 else self.step_ids

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None: ...

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/generate":
                    return self._send(404, {"error": f"no route {self.path}"})
                ids = server._turn(body["input_ids"])
                meta = {"id": body.get("rid"), "finish_reason": {"type": "stop", "matched": ids[-1]},
                        "prompt_tokens": len(body["input_ids"]), "completion_tokens": len(ids), "weight_version": "0",
                        "output_token_logprobs": [[-0.1, t, None] for t in ids]}  # fmt: skip
                self._send(200, {"text": "", "output_ids": ids, "meta_info": meta})

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
    args = ap.parse_args()
    p = calibration_params(args)
    with tempfile.TemporaryDirectory() as d:
        measured = asyncio.run(measured_run(p, args.turn, Path(d)))
    # the simulator's rollouts hold their slots as long as the measured ones: generation + the measured rest
    predicted = sim.simulate(dataclasses.replace(p, non_gen_share=measured["non_gen_share"]), "refill")
    t = Table(
        title=f"refill calibration: {p.slots} concurrent, {p.tasks_per_iter} x {p.n} per update, timeout "
        f"{p.timeout_s:g} s, train {p.train_fixed_s:g} s, sync {p.sync_s:g} s, {p.iterations} updates"
    )
    for col in ("", "iteration s", "rollout-server idle"):
        t.add_column(col, justify="right")
    t.add_row("measured (service + agent + HTTP)", f"{measured['iteration_s']:.2f}", f"{measured['idle']:.1%}")
    t.add_row("simulated (rl_pipeline_sim refill)", f"{predicted.iteration_s:.2f}", f"{predicted.idle_fraction:.1%}")
    err_it = predicted.iteration_s / measured["iteration_s"] - 1
    err_idle = predicted.idle_fraction / measured["idle"] - 1 if measured["idle"] > 0 else math.nan
    t.add_row("sim / measured - 1", f"{err_it:+.1%}", f"{err_idle:+.1%}")
    console = Console(width=140)
    console.print(t)
    console.print(
        f"rollouts started: measured {measured['rollouts']}, simulated {len(predicted.rollouts)}; share of rollout "
        f"time outside generation (agent loop, HTTP), measured and given to the simulator: "
        f"{measured['non_gen_share']:.1%}"
    )
    if args.klong:
        console.print(klong_table())


if __name__ == "__main__":
    main()

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
steps. The share of a rollout's unpaused server time not spent generating (agent loop, tools, HTTP) is measured
and given to the simulator (``non_gen_share``); everything else is the same settings (judged beside the slot).

``--real-trainer``: the trainer is ``klong-rl`` itself (a subprocess: experiment=rl_demo, no SFT, refill on, one
stage of these settings, disk weight sync, in_place pauses, zero-variance groups kept so every update trains)
with its in-process service, bwrap sandboxes and check-command judge, against ``TrainerEngineServer`` (the
double plus the weight-push routes; replies in the run's demo_bpe tokens, each marked with its rollout so that
a context cut by the context policy stays the same rollout). Measured from the double: idle share and iteration
time from the first request to the end of the ``--iterations``-th push, and the share outside generation; from
the run: update time (iteration_s - refill/wait_s - the push pause), push pause, judge latency, and the time a
rollout holds its slot before and after its server sees it (``meta.slot_s`` minus first request -> last reply:
sandbox start, task files, export), all given to the simulator. The run is stopped there (before its stage-end
evaluation). ``--seeds 0,1,2`` repeats the run per seed and prints the means.

    python benchmarks/refill_calibration.py [--concurrency 16] [--n 4] [--tasks 4] [--timeout 4] [--klong]
    python benchmarks/refill_calibration.py --real-trainer --concurrency 8 --n 4 --tasks 2 --iterations 10 \
        --timeout 8 --turn 2 --sync 0.5 --seeds 0,1,2
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
        self.tokenize = tokenize
        self.step_ids = tokenize("Next step.\n" + format_hermes("bash", {"command": "make"})) + [eot]
        self.submit_ids = tokenize(format_hermes("submit", {"summary": "done"})) + [eot]
        self.rollouts: dict[tuple[Any, ...], list[float]] = {}  # rollout -> [generation need left, start]
        self.gen_s = 0.0  # generation served (weight-sync pauses excluded)
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

    def _reply(self, key: tuple[Any, ...], submit: bool) -> list[int]:
        """Reply tokens of rollout ``key``: a ``bash`` step or the ``submit`` call (called under ``lock``)."""
        return self.submit_ids if submit else self.step_ids

    def _replied(self, key: tuple[Any, ...], finished: bool) -> None:
        """Called under ``lock`` after each reply; ``finished``: the rollout's last one."""

    def _turn(self, input_ids: list[int]) -> list[int]:
        with self.lock:
            key = self._key(input_ids)
            now = time.monotonic()
            if key not in self.rollouts:
                self.rollouts[key] = [self.work[len(self.rollouts)], now]
            left, start = self.rollouts[key]
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
            now = time.monotonic()
            ids = self._reply(key, submit=left - span <= 1e-9)
            self._replied(key, left - span <= 1e-9 or now >= start + self.p.timeout_s - 0.01)
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
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._send(*server.route(self.path, json.loads(raw) if raw else {}))

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
    busy, gen = held[0], double.gen_s
    counter.cancel()
    await svc.close()
    await engine.close()
    double.http.shutdown()
    return {"iteration_s": total / p.iterations, "idle": 1 - busy / (p.slots * total), "rollouts": len(double.rollouts),
            "non_gen_share": 1 - gen / busy}  # fmt: skip


class TrainerEngineServer(LatencyEngineServer):
    """The double ``klong-rl`` itself runs against (``--real-trainer``). ``/generate`` as above, but the samples
    of a group share a prompt and the context policy cuts long contexts, so every reply carries a marker
    ``[rollout k turn t]`` and a request belongs to the rollout of the last marker in its context (the newest
    turns are never cut), or starts one; plus what ``SGLangEngine`` calls around a disk weight push
    (rollout/sglang.py ``update_weights``, replies shaped like rollout/devserver.py's): ``/pause_generation`` stops
    every generation clock (SGLang's in_place pause), ``/update_weights_from_disk`` takes ``load_s`` and records
    the version, ``/continue_generation`` resumes, ``/model_info`` reports the version. Slot use is counted from
    a rollout's first request to its last reply while no pause holds (as above)."""

    MARKER = re.compile(r"\[rollout (\d+) turn \d+\]")

    def __init__(self, p: sim.SimParams, turn_s: float, tok: Any, eot: int, load_s: float) -> None:
        self.decode = tok.decode
        self.turns: dict[tuple[Any, ...], int] = {}
        self.live: set[tuple[Any, ...]] = set()  # rollouts between their first request and their last reply
        self.load_s, self.first_s, self.held_s = load_s, 0.0, 0.0
        self.inflight: set[tuple[Any, ...]] = set()  # rollouts with a request being answered
        self.syncs: list[tuple[float, float, float, float, str]] = []  # pause start, end, held, gen at end, version
        super().__init__(p, 0, turn_s, lambda text: tok(text, add_special_tokens=False)["input_ids"], eot)
        threading.Thread(target=self._count, daemon=True).start()

    def _key(self, input_ids: list[int]) -> tuple[Any, ...]:
        found = self.MARKER.findall(self.decode(input_ids[-4096:], skip_special_tokens=False))
        if found:
            key = ("rollout", int(found[-1]))
        else:
            key = ("rollout", len(self.rollouts))
            self.live.add(key)
            self.first_s = self.first_s or time.monotonic()
        self.inflight.add(key)
        return key

    def _reply(self, key: tuple[Any, ...], submit: bool) -> list[int]:
        self.turns[key] = turn = self.turns.get(key, 0) + 1
        return self.tokenize(f"[rollout {key[1]} turn {turn}] ") + super()._reply(key, submit)

    def _replied(self, key: tuple[Any, ...], finished: bool) -> None:
        self.inflight.discard(key)
        if finished:
            self.live.discard(key)

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
                self.syncs.append((self.pause_s, time.monotonic(), self.held_s, self.gen_s, self.version))
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


def slot_overhead(records: list[dict[str, Any]], timeout_s: float) -> float:
    """Mean time a stored rollout held its slot outside its server's view: ``meta.slot_s`` (rollout/service.py)
    minus first request -> last reply (the stage timeout for a timed-out one), from the agent's own step times."""
    over = []
    for r in records:
        m = r["meta"]
        if "slot_s" not in m or not m["steps"]:
            continue
        first, last = m["steps"][0], m["steps"][-1]
        end = timeout_s if m.get("timed_out") else last["t_s"] + last["gen_s"]
        over.append(m["slot_s"] - (end - first["t_s"]))
    return sum(over) / len(over)


def trainer_run(args: argparse.Namespace, p: sim.SimParams, out: Path) -> dict[str, Any]:
    """``klong-rl`` (experiment=rl_demo, refill, disk weight sync) against a ``TrainerEngineServer``: returns the
    double's iteration time and idle share to the last push's end and what the simulator is given (the run's mean
    update and push times, judge latency, slot overhead, the share of server time outside generation)."""
    tok = load_tokenizer("demo_bpe")
    double = TrainerEngineServer(p, args.turn, tok, Renderer(tok).eot_id, args.sync)
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
    syncs = [s for s in double.syncs if s[4] != "0"]  # version 0: the push at start-up, before any rollout
    if len(rows) < p.iterations or len(syncs) < p.iterations:
        raise SystemExit(f"klong-rl stopped after {len(rows)} updates ({len(syncs)} pushes); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))  # fmt: skip
    end, held, gen = syncs[p.iterations - 1][1:4]
    total = end - double.first_s
    sync = sum(s[1] - s[0] for s in syncs[: p.iterations]) / p.iterations
    update = sum(r["iteration_s"] - r.get("refill/wait_s", 0.0) for r in rows) / len(rows) - sync
    judge = sorted(r.get("judge_queue/latency_train_p50", 0.0) for r in rows)[len(rows) // 2]
    records = [json.loads(line) for line in (out / "refill" / "rollouts.jsonl").read_text().splitlines()]
    started = sum(1 for k in double.rollouts.values() if k[1] <= end)
    return {"iteration_s": total / p.iterations, "idle": 1 - held / (p.slots * total), "update_s": update,
            "sync_s": sync, "judge_s": judge, "rollouts": started, "non_gen_share": 1 - gen / held,
            "slot_overhead_s": slot_overhead(records, p.timeout_s)}  # fmt: skip


def calibration_params(args: argparse.Namespace, seed: int) -> sim.SimParams:
    """The simulator's settings for a measured run (the service grades beside the slot)."""
    return sim.SimParams(
        timeout_s=args.timeout, servers=1, slots_per_server=args.concurrency, tasks_per_iter=args.tasks, n=args.n,
        iterations=args.iterations, judge_workers=args.concurrency, judge_median_s=0.0, train_fixed_s=args.train,
        train_s_per_rollout_hour=0.0, sync_s=args.sync, eval_every=0, seed=seed,
    )  # fmt: skip


def calibrate(args: argparse.Namespace, seed: int, out: Path) -> tuple[dict[str, Any], sim.SimResult]:
    """One measured run and the simulator's prediction for the same settings and what was measured."""
    p = calibration_params(args, seed)
    if args.real_trainer:
        m = trainer_run(args, p, out)
        p = dataclasses.replace(p, train_fixed_s=m["update_s"], sync_s=m["sync_s"], judge_median_s=m["judge_s"],
                                slot_overhead_s=m["slot_overhead_s"])  # fmt: skip
    else:
        m = asyncio.run(measured_run(p, args.turn, out))
    # the simulator's rollouts keep their servers as long as the measured ones: generation + the measured rest
    return m, sim.simulate(dataclasses.replace(p, non_gen_share=m["non_gen_share"]), "refill")


def klong_table() -> Table:
    """Simulated idle share at KLong scale: 64 rollout servers x 16 slots = 1,024 concurrent rollouts."""
    t = Table(title="KLong scale (simulated): 64 servers x 16 slots = 1,024 concurrent, 128 tasks x 8 per step")
    for col in ("stage timeout", "mode", "iteration h", "rollout-server idle", "mean staleness", "speed-up"):
        t.add_column(col, justify="right")
    for hours in (2, 4, 6):
        p = sim.SimParams(timeout_s=hours * sim.HOUR, servers=64, slots_per_server=16, tasks_per_iter=128, n=8,
                          iterations=8, judge_workers=128, train_s_per_rollout_hour=1.0, eval_every=0)  # fmt: skip
        res = {m: sim.simulate(p, m) for m in ("sync", "partial", "refill")}
        res["refill_judge_in_slot"] = sim.simulate(dataclasses.replace(p, judge_in_slot=True), "refill")
        for m, r in res.items():
            speed = res["sync"].iteration_s / r.iteration_s
            name = sim.MODE_NAMES.get(m, "refill, judged in the slot (first service)")
            t.add_row(f"{hours} h", name, f"{r.iteration_s / sim.HOUR:.2f}", f"{r.idle_fraction:.1%}",
                      f"{sum(r.staleness) / len(r.staleness):.2f}", f"{speed:.2f}x")  # fmt: skip
    return t


def _compared(it_measured: float, it_sim: float, idle_measured: float, idle_sim: float) -> list[str]:
    """Table cells: iteration time and idle share, measured / simulated, each with sim / measured - 1."""
    return [f"{it_measured:.2f} / {it_sim:.2f}", f"{it_sim / it_measured - 1:+.1%}",
            f"{idle_measured:.1%} / {idle_sim:.1%}", f"{idle_sim / idle_measured - 1:+.1%}"]  # fmt: skip


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
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: a measured run each, and their mean")
    ap.add_argument("--klong", action="store_true", help="also print the KLong-scale simulation")
    ap.add_argument("--real-trainer", action="store_true", help="klong-rl (rl_demo, refill) as the trainer; "
                    "--sync: the double's weight-load time (update and push times are measured)")  # fmt: skip
    ap.add_argument("--out", help="keep each run's output directory (--real-trainer: klong-rl's log) under here")
    args = ap.parse_args()
    who = "klong-rl + service + agent + HTTP" if args.real_trainer else "service + agent + HTTP"
    t = Table(title=f"refill calibration, measured ({who}) / simulated (rl_pipeline_sim refill): {args.concurrency} "
              f"concurrent, {args.tasks} x {args.n} per update, timeout {args.timeout:g} s, turn {args.turn:g} s, "
              f"{args.iterations} updates")  # fmt: skip
    cols = ["seed", "iteration s", "error", "rollout-server idle", "error", "rollouts", "outside gen", "slot extra s"]
    cols += ["update s", "push pause s"] if args.real_trainer else []
    for col in cols:
        t.add_column(col, justify="right")
    runs = []
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(x) for x in args.seeds.split(",")]:
            out = Path(args.out or tmp) / f"seed{seed}"
            m, r = calibrate(args, seed, out)
            runs.append((m, r))
            p = r.params
            t.add_row(str(seed), *_compared(m["iteration_s"], r.iteration_s, m["idle"], r.idle_fraction),
                      f"{m['rollouts']} / {len(r.rollouts)}", f"{p.non_gen_share:.1%}", f"{p.slot_overhead_s:.2f}",
                      *([f"{p.train_fixed_s:.2f}", f"{p.sync_s:.2f}"] if args.real_trainer else []))  # fmt: skip
    if len(runs) > 1:
        figures = [(m["iteration_s"], r.iteration_s, m["idle"], r.idle_fraction) for m, r in runs]
        t.add_row("mean", *_compared(*(sum(col) / len(runs) for col in zip(*figures, strict=True))))
    console.print(t)
    console.print("outside gen: share of a rollout's server time (first request to last reply, pauses excluded) "
                  "not generating (tools, agent loop, HTTP); slot extra: seconds a rollout holds its slot beyond "
                  "that (sandbox start, export); both measured and given to the simulator"  # fmt: skip
                  + ("; update (taken groups -> push) and push pause from klong-rl's metrics" if args.real_trainer
                     else ""))  # fmt: skip
    if args.klong:
        console.print(klong_table())


if __name__ == "__main__":
    main()

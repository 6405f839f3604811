"""SGLangEngine routing over several klong-devserver processes: least-loaded spreading, fail-over
when a server dies mid-rollout (no trajectory lost), timeouts on a server that never answers,
clear errors when none is left, and the devserver's error replies."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.config.rollout import RolloutConfig, SamplingConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.trajectory import Message, read_trajectories
from klong_megatron.rollout.agent import AgentLoop
from klong_megatron.rollout.engine import EngineError, SamplingParams, WeightUpdate
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.sglang import SGLangEngine
from klong_megatron.rollout.store import TrajectoryStore


def start_devservers(n: int) -> list[tuple[subprocess.Popen, str]]:
    """Start ``n`` klong-devserver processes in parallel (one torch thread each: they share the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "klong_megatron.cli.devserver",
        "--port",
        "0",
        "--max-context",
        "2048",
        "--threads",
        "1",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for _ in range(n)
    ]
    out = []
    for proc in procs:
        line = proc.stdout.readline()
        assert "listening on" in line, f"devserver did not start: {line!r}"
        out.append((proc, line.strip().rsplit(" ", 1)[-1]))
    return out


@pytest.fixture(scope="module")
def servers():
    started = start_devservers(3)  # the third is killed by the fail-over test
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_spread_over_servers_by_load(servers):
    async def go():
        eng = SGLangEngine([url for _, url in servers], request_timeout_s=30)
        sp = SamplingParams(max_new_tokens=48, temperature=1.0)
        gens = await asyncio.gather(*(eng.generate([1, 2, 3], sp) for _ in range(8)))
        await eng.close()
        return gens, eng.stats()

    gens, stats = asyncio.run(go())
    assert all(len(g.output_ids) == len(g.output_logprobs) > 0 for g in gens)
    assert {g.server for g in gens} == {url for _, url in servers}
    assert sorted(s["served"] for s in stats.values()) == [2, 3, 3]


def test_dead_url_is_skipped_and_marked_down(servers):
    dead = f"http://127.0.0.1:{free_port()}"

    async def go():
        eng = SGLangEngine([dead, servers[0][1]], request_timeout_s=30, cooldown_s=60)
        gens = [await eng.generate([5, 6], SamplingParams(max_new_tokens=4)) for _ in range(4)]
        await eng.close()
        return gens, eng.stats()

    gens, stats = asyncio.run(go())
    assert all(g.server == servers[0][1] for g in gens)
    assert stats[dead]["failures"] == 1  # tried once, then left alone during its cooldown


def test_silent_server_times_out_then_fails_over(servers):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    async def go():
        eng = SGLangEngine([url, servers[1][1]], request_timeout_s=0.5, max_attempts=2)
        eng.servers[1].inflight = 1  # make the silent server the least loaded one
        t0 = time.monotonic()
        g = await eng.generate([5, 6], SamplingParams(max_new_tokens=4))
        await eng.close()
        return g, time.monotonic() - t0

    try:
        g, took = asyncio.run(go())
    finally:
        silent.close()
    assert g.server == servers[1][1] and took < 10


def test_no_server_left_is_a_clear_error_not_a_hang():
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def go():
        eng = SGLangEngine(urls, request_timeout_s=1, connect_timeout_s=1)
        try:
            with pytest.raises(EngineError, match="generate failed on 2 server"):
                await eng.generate([1], SamplingParams(max_new_tokens=2))
            assert await eng.health() is False
        finally:
            await eng.close()

    asyncio.run(go())


def test_devserver_rejects_bad_requests_with_the_field_named(servers):
    url = servers[0][1]
    r = httpx.post(f"{url}/generate", json={"input_ids": "12", "sampling_params": {}})
    assert r.status_code == 400 and "input_ids" in r.json()["error"]  # /generate: SGLang's {"error": text}
    r = httpx.post(f"{url}/generate", json={"input_ids": [1], "sampling_params": {"top_p": 0}})
    assert r.status_code == 400 and "top_p" in r.json()["error"]
    r = httpx.post(f"{url}/generate", content=b"{nope")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    assert httpx.get(f"{url}/nowhere").status_code == 404


def test_chat_completions_speak_openai_format(servers):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Grade this."}], "max_tokens": 8, "seed": 1}
    r = httpx.post(f"{servers[0][1]}/v1/chat/completions", json=body, timeout=30).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert r["usage"]["completion_tokens"] <= 8 and r["choices"][0]["finish_reason"] in ("stop", "length")


def test_nccl_weight_sync_is_refused_by_the_devserver_with_a_reason(servers):
    update = WeightUpdate(version="1", names=("w",), dtypes=("bfloat16",), shapes=((2, 2),), master_port=1)

    async def go():
        eng = SGLangEngine([servers[0][1]])
        try:
            with pytest.raises(EngineError, match="init_weights_update_group.*GPUs"):
                await eng.join_group(update, [1])
        finally:
            await eng.close()

    asyncio.run(go())


def test_server_killed_mid_rollout_loses_no_trajectory(tmp_path, servers):
    """Rollouts with the tiny model over two devservers; one is killed while generating."""
    procs = servers[1:]
    try:
        tok = load_tokenizer("byte")
        renderer = Renderer(tok)
        pol = ContextPolicy.from_renderer(ContextPolicyConfig(max_len=2048, gen_reserve=80), renderer)
        cfg = RolloutConfig(sampling=SamplingConfig(max_new_tokens=48), max_turns=3, timeout_s=120)
        engine = SGLangEngine([u for _, u in procs], request_timeout_s=30, cooldown_s=600)
        agent = AgentLoop(engine, renderer, pol, cfg)

        class NoTools:
            def call(self, name: str, arguments: str) -> str:
                return "ok"

        async def rollout(task: RolloutTask):
            return await agent.run(task, NoTools())

        async def go():
            store = TrajectoryStore(tmp_path / "s.jsonl")
            tasks = [
                RolloutTask("t", [Message("system", "Agent."), Message("user", "Go.")], sample=i) for i in range(4)
            ]
            run = asyncio.create_task(RolloutManager(rollout, store, concurrency=4, progress=False).run(tasks))
            while sum(s.served for s in engine.servers) < 3:
                await asyncio.sleep(0.02)
            os.kill(procs[1][0].pid, signal.SIGKILL)
            stats = await run
            await engine.close()
            return stats

        stats = asyncio.run(go())
    finally:
        procs[1][0].kill()
    assert stats.finished == 4 and stats.failed == 0
    assert engine.stats()[procs[1][1]]["failures"] >= 1
    trajs = list(read_trajectories(tmp_path / "s.jsonl"))
    assert len(trajs) == 4 and all(t.meta["turns"] == 3 for t in trajs)
    late = [s["server"] for t in trajs for s in t.meta["steps"]][-4:]
    assert procs[0][1] in late

"""Distributed weight sync (rl.weight_sync=distributed) on CPU: a tiny Megatron GPT in this process
pushes its weights over gloo to real ``klong-devserver`` subprocesses through ``DistributedWeightSync``
and SGLang's protocol (pause, begin_weight_update, bucketed /update_weights_from_distributed,
end_weight_update, continue, version and /weights_checker verification).

The reference is a dev model loaded from the disk export (``export_hf``) of the same weights: the
disk path the distributed one replaces. Greedy generations must match token for token."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.megatron.hf import export_hf, hf_tensors
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed
from klong_megatron.rl.servers import DevServerProcess
from klong_megatron.rl.weight_sync import DistributedWeightSync, WeightSyncError, free_port
from klong_megatron.rollout.devmodel import DevModel, HFCausalLM, tiny_llama
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.engine import Generation, SamplingParams
from klong_megatron.rollout.sglang import SGLangEngine, parse_generate_reply

PROMPT = [72, 101, 108, 108, 111, 32]  # "Hello " in the byte tokenizer
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, ModelConfig, Megatron model, [two dev servers on the model's initial export])."""
    init_distributed(ParallelConfig(), seed=0)
    tok = load_tokenizer("byte")
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      vocab_size=len(tok), seq_length=128, transformer_impl="local")  # fmt: skip
    model = build_gpt(cfg).eval()
    initial = export_hf(model, cfg, tmp_path_factory.mktemp("initial"), tok)
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda seed: DevServerProcess(initial, threads=1, seed=seed), [0, 1]))
    yield tok, cfg, model, servers
    for s in servers:
        s.close()
    destroy_distributed()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """New, larger random weights (the untrained init is nearly uniform: every prompt looks alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def _served(url: str) -> Generation:
    body = {"input_ids": PROMPT, "sampling_params": GREEDY.to_sglang(), "return_logprob": True}
    return parse_generate_reply(httpx.post(f"{url}/generate", json=body, timeout=30).json(), server=url)


def _from_disk(model: torch.nn.Module, cfg: ModelConfig, tok, out: Path) -> Generation:
    """What the disk path would serve: export, load like the dev server does, generate greedily."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the dev servers run, so that the float sums agree
    try:
        return DevModel(HFCausalLM.from_dir(export_hf(model, cfg, out, tok))).generate(PROMPT, GREEDY)
    finally:
        torch.set_num_threads(threads)


def _same(served: Generation, ref: Generation) -> None:
    assert served.output_ids == ref.output_ids
    assert served.output_logprobs == pytest.approx(ref.output_logprobs, abs=1e-4)


def test_pushes_reach_two_servers_like_a_disk_export(setup, tmp_path):
    tok, cfg, model, servers = setup
    urls = [s.url for s in servers]
    before = _served(urls[0])

    async def push(sync: DistributedWeightSync, version: str, seed: int) -> None:
        _perturb(model, seed)
        await sync.push_model(model, cfg, version)

    async def go() -> list[list[Generation]]:
        engine = SGLangEngine(urls, control_timeout_s=30)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                     timeout_s=30, bucket_bytes=20_000, verify="checksum")  # fmt: skip
        try:
            await push(sync, "v1", seed=1)
            assert sync.world_size == 3 and [s.rank_offset for s in engine.servers] == [1, 2]
            largest = max(p.numel() * p.element_size() for p in model.parameters())  # the embedding
            assert sync.last_push["buckets"] > 3 and sync.last_push["max_bucket_bytes"] <= max(20_000, largest)
            v1 = [_served(u) for u in urls] + [_from_disk(model, cfg, tok, tmp_path / "v1")]
            await push(sync, "v2", seed=2)  # the group is reused: no second join
            v2 = [_served(u) for u in urls] + [_from_disk(model, cfg, tok, tmp_path / "v2")]
        finally:
            await sync.close()
            await engine.close()
        return [v1, v2]

    v1, v2 = asyncio.run(go())
    for *served, ref in (v1, v2):
        for g in served:
            _same(g, ref)
    assert [g.weight_version for g in v1[:2]] == ["v1", "v1"]
    assert [g.weight_version for g in v2[:2]] == ["v2", "v2"]
    assert v1[0].output_logprobs != before.output_logprobs
    assert v2[0].output_ids != v1[0].output_ids  # new weights, new greedy continuation
    info = httpx.get(f"{urls[0]}/server_info").json()
    assert info["tp_size"] == 1


def test_down_server_is_named_and_nothing_is_sent(setup):
    _, cfg, model, servers = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    version_before = httpx.get(f"{servers[0].url}/get_model_info").json()["weight_version"]

    async def go() -> None:
        engine = SGLangEngine([servers[0].url, dead], control_timeout_s=5)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                     timeout_s=10)  # fmt: skip
        try:
            with pytest.raises(WeightSyncError, match=f"{dead}/server_info.*is the server up"):
                await sync.push_model(model, cfg, "never")
        finally:
            await sync.close()
            await engine.close()

    t0 = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - t0 < 10
    assert httpx.get(f"{servers[0].url}/get_model_info").json()["weight_version"] == version_before


def test_silent_server_times_out_with_its_name(setup):
    _, cfg, model, _ = setup
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    async def go() -> None:
        engine = SGLangEngine([url], control_timeout_s=1)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo")
        try:
            with pytest.raises(WeightSyncError, match=f"{url}/server_info: ReadTimeout"):
                await sync.push_model(model, cfg, "never")
        finally:
            await engine.close()

    try:
        t0 = time.monotonic()
        asyncio.run(go())
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()


def test_server_refusing_to_join_fails_the_push_at_once(setup):
    """The server already has a group of that name: its 400 ends the push while the trainer still waits."""
    _, cfg, model, servers = setup

    async def go() -> float:
        engines = [SGLangEngine([servers[0].url], control_timeout_s=10) for _ in range(2)]
        first, second = (
            DistributedWeightSync(e, master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                  group_name="taken", timeout_s=5)
            for e in engines
        )  # fmt: skip
        try:
            await first.push_model(model, cfg, "first")
            t0 = time.monotonic()
            with pytest.raises(WeightSyncError, match=f"{servers[0].url}/init_weights_update_group.*already exists"):
                await second.push_model(model, cfg, "second")
            took = time.monotonic() - t0
            with pytest.raises(WeightSyncError, match="broken by an earlier failure"):
                await second.push_model(model, cfg, "third")
            return took
        finally:
            for sync in (first, second):
                await sync.close()
            for e in engines:
                await e.close()

    assert asyncio.run(go()) < 4  # not the 5 s the trainer's rendezvous would wait
    assert httpx.get(f"{servers[0].url}/get_model_info").json()["weight_version"] == "first"


def test_server_keeps_serving_while_a_join_waits_for_the_trainer(setup):
    url = setup[3][1].url
    body = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
            "group_name": "nobody_hosts_this", "backend": "gloo"}  # fmt: skip

    def join() -> None:  # answered only when the server's join times out (or the server is stopped)
        try:
            httpx.post(f"{url}/init_weights_update_group", json=body, timeout=60)
        except httpx.HTTPError:
            pass

    threading.Thread(target=join, daemon=True).start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert _served(url).output_ids and time.monotonic() - t0 < 10
    update = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": body["group_name"]}
    r = httpx.post(f"{url}/update_weights_from_distributed", json=update, timeout=10)
    assert r.status_code == 400 and "must run between begin_weight_update()" in r.json()["message"]
    assert httpx.post(f"{url}/begin_weight_update", json={}, timeout=10).status_code == 200
    try:
        r = httpx.post(f"{url}/update_weights_from_distributed", json=update, timeout=10)
        assert r.status_code == 400 and "not initialised" in r.json()["message"]
    finally:
        httpx.post(f"{url}/end_weight_update", json={}, timeout=10)
    r = httpx.post(f"{url}/update_weights_from_distributed", json={**update, "dtypes": ["float33"]}, timeout=10)
    assert r.status_code == 400 and "dtypes" in r.json()["error"]["message"]


def test_a_renamed_parameter_fails_the_push_by_name(setup):
    """SGLang's loaders skip unknown names: the push 'succeeds' on the server; the checksum check catches it."""
    _, cfg, model, servers = setup
    from klong_megatron.megatron.hf import hf_tensors

    tensors = dict(hf_tensors(model, cfg))
    tensors["model.layers.0.mlp.gate.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight") + 1.0

    async def go() -> None:
        engine = SGLangEngine([servers[1].url], control_timeout_s=30)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo",
                                     timeout_s=30, verify="checksum")  # fmt: skip
        try:
            with pytest.raises(WeightSyncError, match=r"1 pushed name\(s\) unknown.*model.layers.0.mlp.gate.weight"):
                await sync.push(tensors, "renamed")
            strict = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(),
                                           backend="gloo", known_names=set(hf_tensors(model, cfg)))  # fmt: skip
            with pytest.raises(WeightSyncError, match="does not have, e.g. 'model.layers.0.mlp.gate.weight'"):
                await strict.push(tensors, "never")
        finally:
            await sync.close()
            await engine.close()

    asyncio.run(go())
    assert httpx.get(f"{servers[1].url}/model_info").json()["weight_version"] == "renamed"


def test_servers_with_pipeline_or_data_parallelism_are_refused_by_name(setup):
    _, cfg, model, _ = setup

    class PipelinedServer(DevServer):  # a double of an SGLang server launched with --pp-size 2
        def server_info(self):
            return super().server_info() | {"pp_size": 2}

    dev = PipelinedServer(DevModel(HFCausalLM(tiny_llama(256))), model_path="x").start()

    async def go() -> None:
        engine = SGLangEngine([dev.url], control_timeout_s=5)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo")
        try:
            with pytest.raises(WeightSyncError, match=rf"pp_size = dp_size = 1.*{dev.url} \(pp_size=2, dp_size=1\)"):
                await sync.push_model(model, cfg, "never")
        finally:
            await engine.close()

    try:
        asyncio.run(go())
    finally:
        dev.close()


def test_a_push_failing_before_the_first_bucket_still_drains_the_stream(setup):
    """With a sharded policy the other trainer ranks are inside the stream's collectives
    (``contribute_shards``): a push that fails early (a server down at the first push) must still
    consume the whole stream, or those ranks would wait forever."""
    _, cfg, model, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    names = list(hf_tensors(model, cfg))
    produced: list[str] = []

    def stream():
        for name, t in hf_tensors(model, cfg).items():
            produced.append(name)
            yield name, t

    async def go() -> None:
        engine = SGLangEngine([dead], control_timeout_s=5)
        sync = DistributedWeightSync(engine, master_address="127.0.0.1", master_port=free_port(), backend="gloo")
        try:
            with pytest.raises(WeightSyncError, match="is the server up"):
                await sync.push(stream(), "never")
        finally:
            await engine.close()

    asyncio.run(go())
    assert produced == names

"""klong-devserver against SGLang 0.5.23's contract (``sglang_fixtures.py``, written from SGLang's source),
and the SGLang client's weight-update protocol against the dev server: pause / begin / end / flush /
continue, re-queued aborts, version checks, log-probs at the sampling temperature, SSE streams and the
OpenAI chat surface (tools through the project's parsers, with a real Qwen3 chat template)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from klong_megatron.config.rollout import DevServerConfig
from klong_megatron.data.render import load_tokenizer
from klong_megatron.rollout.devchat import _choice
from klong_megatron.rollout.devmodel import DevModel, HFCausalLM, build_dev_model, tiny_llama
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.engine import Generation, SamplingParams, WeightUpdate
from klong_megatron.rollout.sglang import SGLangEngine
from klong_megatron.rollout.toolcalls import format_hermes
from klong_megatron.rollout.weight_group import overall_checksum, tensor_checksum
from tests.integration.sglang_fixtures import EXCHANGES, SGLANG_VERSION, TENSOR_CHECKSUMS

QWEN3 = Path(__file__).resolve().parents[2].parent / "shared" / "real_tokenizers" / "qwen3"
PROMPT = [10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def server():
    model, tokenizer = build_dev_model(DevServerConfig(max_context=4096))
    with DevServer(model, tokenizer=tokenizer) as s:
        yield s


def _long_generation(url: str) -> threading.Thread:
    """A generation that runs until aborted (holds a KV cache meanwhile)."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4000, "temperature": 0}}
    t = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json=body, timeout=60), daemon=True)
    t.start()
    return t


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.parametrize("ex", EXCHANGES, ids=[e["name"] for e in EXCHANGES])
def test_devserver_answers_like_recorded_sglang(server, ex):
    url, model = server.url, server.model
    worker = None
    if ex["state"] == "session":
        assert httpx.post(f"{url}/begin_weight_update", json={}).status_code == 200
    if ex["state"] == "running":
        worker = _long_generation(url)
        _wait(lambda: model.running() > 0)
    try:
        r = httpx.request(ex["method"], f"{url}{ex['path']}", json=ex["body"], timeout=30)
    finally:
        if ex["state"] == "session" or ex["path"] == "/begin_weight_update" and r.status_code == 200:
            httpx.post(f"{url}/end_weight_update", json={})
        if worker is not None:
            model.abort()
            worker.join(10)
        model.resume()
    assert r.status_code == ex["status"], r.text
    if ex["reply"] is not None:
        assert (r.text if isinstance(ex["reply"], str) else r.json()) == ex["reply"]
    body = r.json() if "json" in r.headers.get("content-type", "") else None
    for key in ex.get("keys", []):
        assert key in body, f"{ex['path']}: reply lacks {key!r}"
    if "error_starts" in ex:
        assert body["error"].startswith(ex["error_starts"])
    if "rank_keys" in ex:
        rank = body["ranks"][0]
        assert sorted(rank) == sorted(ex["rank_keys"])
        assert sorted(rank["parallelism_info"][0]) == sorted(ex["parallelism_keys"])
        assert rank["per_gpu_checksum"] == overall_checksum(rank["checksums"])
        assert body["per_engine_checksum"] == hashlib.sha256(rank["per_gpu_checksum"].encode()).hexdigest()
        state = model.named_tensors()
        assert rank["checksums"]["model.norm.weight"] == tensor_checksum(state["model.norm.weight"])


def test_server_reports_the_sglang_version_it_follows(server):
    assert httpx.get(f"{server.url}/server_info").json()["version"] == SGLANG_VERSION


def test_tensor_checksum_is_sglangs():
    for case in TENSOR_CHECKSUMS:
        t = torch.tensor(case["float32"], dtype=torch.float32)
        assert t.numpy().tobytes().hex() == case["bytes_hex"]
        assert tensor_checksum(t) == case["checksum"]
        assert overall_checksum({"w": case["checksum"]}) == case["overall_for_name_w"]


def test_unimplemented_sampling_key_is_named(server):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "top_k": 5}}
    r = httpx.post(f"{server.url}/generate", json=body)
    assert r.status_code == 400 and "top_k" in r.json()["error"]


def test_logprobs_are_at_the_sampling_temperature_unless_original_is_asked():
    lm = HFCausalLM(tiny_llama(259, seed=3))
    sp = SamplingParams(max_new_tokens=6, temperature=0.5, seed=4)
    scaled, original = DevModel(lm, original_logprobs=False), DevModel(lm, original_logprobs=True)
    a, b = scaled.generate(PROMPT, sp), original.generate(PROMPT, sp)
    assert a.output_ids == b.output_ids  # the switch changes what is reported, not what is sampled
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([PROMPT + a.output_ids])).logits[0, len(PROMPT) - 1 : -1].float()
    ids = torch.tensor(a.output_ids)[:, None]
    at_t = torch.log_softmax(logits / 0.5, -1).gather(1, ids).squeeze(1)
    at_1 = torch.log_softmax(logits, -1).gather(1, ids).squeeze(1)
    assert torch.allclose(torch.tensor(a.output_logprobs), at_t, atol=1e-4)
    assert torch.allclose(torch.tensor(b.output_logprobs), at_1, atol=1e-4)
    assert not torch.allclose(at_t, at_1, atol=1e-2)


def test_generate_stream_is_sse_ending_in_done(server):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "stream": True,
            "return_logprob": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=30) as r:
        assert r.headers["content-type"] == "text/event-stream"
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert len(last["output_ids"]) == 4 and len(last["meta_info"]["output_token_logprobs"]) == 4


def test_pause_aborts_and_the_client_requeues_the_turn(server):
    """A weight update aborts a running generation; the client sends it again after continue."""

    async def go():
        engine = SGLangEngine([server.url], control_timeout_s=10)
        try:
            task = asyncio.create_task(engine.generate(PROMPT, SamplingParams(max_new_tokens=300, temperature=0)))
            await asyncio.to_thread(_wait, lambda: server.model.running() > 0)
            await engine.pause()
            version = server.model.weight_version
            server.model.weight_version = "v-next"  # what a load during the pause would do
            await engine.resume()
            g = await asyncio.wait_for(task, 60)
            return g, engine.requeued, version
        finally:
            await engine.close()

    g, requeued, old = asyncio.run(go())
    server.model.weight_version = old
    assert g.finish_reason == "length" and len(g.output_ids) == 300
    assert g.weight_version == "v-next" and requeued == 1


def test_in_place_pause_keeps_the_request_and_refuses_flush(server):
    worker = _long_generation(server.url)
    _wait(lambda: server.model.running() > 0)
    try:
        assert httpx.post(f"{server.url}/pause_generation", json={"mode": "in_place"}).status_code == 200
        assert httpx.post(f"{server.url}/flush_cache").status_code == 400
        assert server.model.running() == 1  # still holds its cache
        httpx.post(f"{server.url}/continue_generation", json={})
        httpx.post(f"{server.url}/pause_generation", json={"mode": "retract"})
        _wait(lambda: server.model.running() == 0)
        assert httpx.post(f"{server.url}/flush_cache").status_code == 200  # retracted: SGLang can flush
    finally:
        server.model.abort()
        server.model.resume()
        worker.join(10)


def test_disk_update_runs_the_protocol_and_checks_the_version(server, tmp_path):
    other = tiny_llama(259, seed=99, max_context=4096)
    other.save_pretrained(tmp_path / "ckpt")
    initial = {k: v.clone() for k, v in server.model.named_tensors().items()}

    async def go():
        engine = SGLangEngine([server.url], control_timeout_s=10)
        try:
            await engine.update_weights(WeightUpdate(version="disk-1", path=str(tmp_path / "ckpt")))
            return await engine.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))
        finally:
            await engine.close()

    try:
        g = asyncio.run(go())
    finally:
        server.model.lm.model.load_state_dict(initial)
        server.model.weight_version = "0"
    assert g.weight_version == "disk-1" and not server.model.paused
    r = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(tmp_path / "none")})
    assert r.status_code == 400 and r.json()["success"] is False


def test_chat_renders_tools_with_a_real_template_and_returns_tool_calls():
    tok = load_tokenizer(str(QWEN3))
    lm = HFCausalLM(tiny_llama(len(tok), seed=0, max_context=512))
    dev = DevServer(DevModel(lm, name="tiny-qwen3"), tokenizer=tok)
    try:
        tools = [{"type": "function", "function": {"name": "bash", "description": "run a command",
                                                    "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
        prompt = tok.decode(__import__("klong_megatron.rollout.devchat", fromlist=["_prompt"])._prompt(
            dev, {"messages": [{"role": "user", "content": "list files"}], "tools": tools}))  # fmt: skip
        assert "<tools>" in prompt and '"name": "bash"' in prompt  # the template got tools=
        text = "ok " + format_hermes("bash", {"cmd": "ls"})
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        g = Generation(ids, [-0.5] * len(ids), "stop")
        choice = _choice(dev, 0, g, None, True, tools=True)
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "bash" and json.loads(call["arguments"]) == {"cmd": "ls"}
        assert len(choice["logprobs"]["content"]) == len(ids)
        with dev:
            base = dev.url
            models = httpx.get(f"{base}/v1/models").json()
            assert models["data"][0]["id"] == "tiny-qwen3"
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2, "temperature": 1.0,
                    "seed": 1, "logprobs": True}  # fmt: skip
            reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
            assert len(reply["choices"]) == 2 and reply["usage"]["completion_tokens"] <= 10
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
                lines = [x for x in r.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(x[6:]) for x in lines[:-1]]
            assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finally:
        dev.httpd.server_close()

"""The Engine contract, run against every implementation.

``dev``: the in-process DevEngine. ``http``: SGLangEngine talking to a real klong-devserver over
HTTP (the same client code that talks to SGLang on a cluster). Both wrap the same tiny model, so
outputs are also checked against an independent full forward pass (no KV cache).
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from klong_megatron.config.rollout import DevServerConfig
from klong_megatron.rollout.devmodel import DevEngine, build_dev_model, tiny_llama
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.engine import Engine, EngineError, SamplingParams, WeightUpdate
from klong_megatron.rollout.sglang import SGLangEngine

PROMPT = [10, 20, 30, 40, 50]
CTX = 4096


@pytest.fixture(scope="module")
def dev():
    model, tokenizer = build_dev_model(DevServerConfig(max_context=CTX))
    server = DevServer(model, tokenizer=tokenizer).start()
    yield model, server
    server.close()


@pytest.fixture(params=["dev", "http"])
def engine(request, dev):
    model, server = dev
    model.lm.model.load_state_dict(_initial_state(model))
    model.weight_version = "0"
    if request.param == "dev":
        return lambda: DevEngine(model)
    return lambda: SGLangEngine([server.url], request_timeout_s=30)


_STATE: dict = {}


def _initial_state(model):
    if not _STATE:
        _STATE.update({k: v.clone() for k, v in model.lm.model.state_dict().items()})
    return _STATE


def run(make_engine, fn):
    async def go():
        eng = make_engine()
        try:
            return await fn(eng)
        finally:
            await eng.close()

    return asyncio.run(go())


def reference_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """Log-probs of ``output`` given ``prompt`` from one full forward pass (no KV cache)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logp = torch.log_softmax(model.lm.model(input_ids=ids).logits[0].float(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(output)]


def test_implementations_satisfy_the_protocol(engine):
    assert isinstance(engine(), Engine)


def test_greedy_generation_matches_a_full_forward_pass(engine, dev):
    model, _ = dev
    g = run(engine, lambda e: e.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0)))
    assert g.finish_reason == "length" and len(g.output_ids) == 12 == len(g.output_logprobs)
    ids = torch.tensor([PROMPT + g.output_ids])
    with torch.no_grad():
        logits = model.lm.model(input_ids=ids).logits[0]
    argmax = logits[len(PROMPT) - 1 : -1].argmax(-1).tolist()
    assert g.output_ids == argmax
    ref = reference_logprobs(model, PROMPT, g.output_ids)
    assert max(abs(a - b) for a, b in zip(g.output_logprobs, ref, strict=True)) < 1e-4


def test_sampled_logprobs_are_those_of_the_model(engine, dev):
    model, _ = dev
    g = run(engine, lambda e: e.generate(PROMPT, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)))
    ref = reference_logprobs(model, PROMPT, g.output_ids)
    assert all(math.isfinite(x) and x <= 0 for x in g.output_logprobs)
    assert max(abs(a - b) for a, b in zip(g.output_logprobs, ref, strict=True)) < 1e-4


def test_same_seed_same_tokens_other_seed_other_tokens(engine):
    async def three(e):
        sp = SamplingParams(max_new_tokens=24, temperature=1.0)
        a = await e.generate(PROMPT, SamplingParams(**{**sp.__dict__, "seed": 1}))
        b = await e.generate(PROMPT, SamplingParams(**{**sp.__dict__, "seed": 1}))
        c = await e.generate(PROMPT, SamplingParams(**{**sp.__dict__, "seed": 2}))
        return a, b, c

    a, b, c = run(engine, three)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


def test_tiny_top_p_is_greedy(engine):
    async def both(e):
        greedy = await e.generate(PROMPT, SamplingParams(max_new_tokens=10, temperature=0))
        nucleus = await e.generate(PROMPT, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5))
        return greedy, nucleus

    greedy, nucleus = run(engine, both)
    assert nucleus.output_ids == greedy.output_ids


def test_stop_token_ends_the_turn_and_is_kept(engine):
    async def go(e):
        free = await e.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=11))
        stop = free.output_ids[7]
        first = free.output_ids.index(stop)
        stopped = await e.generate(
            PROMPT, SamplingParams(max_new_tokens=20, temperature=1.0, seed=11, stop_token_ids=(stop,))
        )
        return free, stopped, first

    free, stopped, first = run(engine, go)
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[: first + 1]


def test_abort_stops_an_inflight_generation(engine):
    async def go(e):
        task = asyncio.create_task(e.generate(PROMPT, SamplingParams(max_new_tokens=4000, temperature=0)))
        await asyncio.sleep(0.3)
        await e.abort()
        return await asyncio.wait_for(task, 10)

    g = run(engine, go)
    assert g.finish_reason == "abort"
    assert 0 < len(g.output_ids) < 4000


def test_weights_from_disk_change_outputs_and_version(engine, tmp_path):
    other = tiny_llama(259, seed=99, max_context=CTX)
    other.save_pretrained(tmp_path / "ckpt")

    async def go(e):
        sp = SamplingParams(max_new_tokens=10, temperature=0)
        before = await e.generate(PROMPT, sp)
        await e.update_weights(WeightUpdate(version="step-7", path=str(tmp_path / "ckpt")))
        after = await e.generate(PROMPT, sp)
        return before, after

    before, after = run(engine, go)
    assert before.weight_version == "0" and after.weight_version == "step-7"
    with torch.no_grad():
        logits = other(input_ids=torch.tensor([PROMPT + after.output_ids])).logits[0]
    logp = torch.log_softmax(logits, -1)[len(PROMPT) - 1 : -1]
    assert after.output_ids == logp.argmax(-1).tolist()
    expected = logp.gather(1, torch.tensor(after.output_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(after.output_logprobs), expected, atol=1e-4)
    assert not torch.allclose(torch.tensor(before.output_logprobs), expected, atol=1e-2)


def test_weights_from_a_bad_dir_fail_and_keep_serving(engine, tmp_path):
    async def go(e):
        with pytest.raises((EngineError, ValueError), match="config.json|failed"):
            await e.update_weights(WeightUpdate(version="bad", path=str(tmp_path)))
        return await e.generate(PROMPT, SamplingParams(max_new_tokens=3, temperature=0))

    g = run(engine, go)
    assert g.weight_version == "0" and len(g.output_ids) == 3


def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    with pytest.raises(EngineError, match="context"):
        run(engine, lambda e: e.generate([5] * (CTX + 1), SamplingParams(max_new_tokens=4)))


def test_generation_is_cut_at_the_context_length(engine):
    g = run(engine, lambda e: e.generate([7] * (CTX - 7), SamplingParams(max_new_tokens=50, temperature=0)))
    assert g.finish_reason == "length" and len(g.output_ids) == 7


def test_health(engine):
    assert run(engine, lambda e: e.health()) is True

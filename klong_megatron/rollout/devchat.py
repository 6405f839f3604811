"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models`` of ``klong-devserver``.

Dataflow: ``messages`` (+ ``tools``) -> the tokenizer's chat template (``tools=`` passed to it, as
SGLang's ``serving_chat.py`` does) -> ``n`` generations on the dev model -> cut at the first ``stop``
string -> the text parsed by the project's tool-call parser (``rollout/toolcalls.py``, the server's
``tool_format``, like SGLang's ``--tool-call-parser``): a well-formed call becomes ``tool_calls`` and
``finish_reason: "tool_calls"``, the rest stays ``content``; ``logprobs: true`` adds OpenAI's
``choices[i].logprobs.content`` (``top_logprobs`` empty); ``stream: true`` sends
``chat.completion.chunk`` events (role, then the content, then the finish reason) and ``[DONE]``.

Limits: the whole answer is generated before the first chunk is sent; ``top_logprobs`` > 0,
``response_format`` and ``tool_choice`` other than ``auto`` / ``none`` are refused with a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from klong_megatron.rollout.devserver import BadRequest, DevServer, stop_strings
from klong_megatron.rollout.engine import Generation, SamplingParams
from klong_megatron.rollout.toolcalls import PARSERS


def models(dev: DevServer) -> dict[str, Any]:
    """``GET /v1/models``: the one served model."""
    return {"object": "list", "data": [{"id": dev.model.name, "object": "model", "created": int(dev.started),
                                        "owned_by": "sglang", "root": dev.model_path or dev.model.name}]}  # fmt: skip


def _prompt(dev: DevServer, body: dict[str, Any]) -> list[int]:
    if dev.tokenizer is None or not getattr(dev.tokenizer, "chat_template", None):
        raise BadRequest("this dev server has no tokenizer with a chat template")
    messages, tools = body.get("messages"), body.get("tools")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("field 'messages': expected a non-empty list")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("field 'tools': expected a list")
    if body.get("tool_choice", "auto") not in ("auto", "none"):
        raise BadRequest(f"field 'tool_choice': {body['tool_choice']!r} is not supported by the dev server")
    if body.get("top_logprobs") or body.get("response_format"):
        raise BadRequest("fields 'top_logprobs' > 0 and 'response_format' are not supported by the dev server")
    if body.get("tool_choice") == "none":
        tools = None
    try:
        text = dev.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise BadRequest(f"field 'messages': chat template failed: {e}") from e
    return dev._encode(text)


def _sampling(body: dict[str, Any]) -> SamplingParams:
    params = {"max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens", 256)),
              "temperature": body.get("temperature", 1.0)}  # fmt: skip
    params |= {k: body[k] for k in ("top_p", "seed") if body.get(k) is not None}
    try:
        return SamplingParams.from_sglang(params)
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e)) from e


def _choice(
    dev: DevServer, index: int, g: Generation, matched: str | None, want_logprobs: bool, tools: bool
) -> dict[str, Any]:
    ids = g.output_ids[:-1] if g.finish_reason == "stop" and matched is None else g.output_ids
    text = dev._decode(ids)
    if matched is not None:
        text = text[: text.index(matched)]
    reason = "length" if g.finish_reason == "length" else "stop"
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tools and dev.tool_format in PARSERS:
        parsed = PARSERS[dev.tool_format](text)
        if parsed.calls:
            message["content"] = parsed.content.strip() or None
            message["tool_calls"] = [
                {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "index": k,
                 "function": {"name": c.name, "arguments": c.arguments}}
                for k, c in enumerate(parsed.calls)
            ]  # fmt: skip
            reason = "tool_calls"
        if parsed.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
    out: dict[str, Any] = {"index": index, "message": message, "finish_reason": reason, "logprobs": None}
    if want_logprobs:
        out["logprobs"] = {"content": [
            {"token": dev._decode([t]), "logprob": lp, "bytes": list(dev._decode([t]).encode()), "top_logprobs": []}
            for t, lp in zip(g.output_ids, g.output_logprobs, strict=True)
        ]}  # fmt: skip
    return out


def chat(dev: DevServer, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/chat/completions`` (non-streaming)."""
    ids = _prompt(dev, body)
    sampling = _sampling(body)
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequest(f"field 'n': expected an int >= 1, got {n!r}")
    stops = stop_strings({"stop": body.get("stop")})
    tools = bool(body.get("tools")) and body.get("tool_choice", "auto") != "none"
    choices, completion = [], 0
    for i in range(n):
        sp = sampling if sampling.seed is None else SamplingParams(**{**sampling.__dict__, "seed": sampling.seed + i})
        g, matched = dev.run_generation(ids, sp, uuid.uuid4().hex, stops)
        choices.append(_choice(dev, i, g, matched, bool(body.get("logprobs")), tools))
        completion += len(g.output_ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or dev.model.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": len(ids),
            "completion_tokens": completion,
            "total_tokens": len(ids) + completion,
        },  # fmt: skip
    }


def chat_stream(dev: DevServer, body: dict[str, Any]) -> Iterator[bytes]:
    """``stream: true``: ``chat.completion.chunk`` SSE events per choice, then ``data: [DONE]``."""
    try:
        full = chat(dev, body)
    except BadRequest as e:
        yield b"data: " + json.dumps({"error": {"message": str(e), "type": "BadRequest", "code": 400}}).encode()
        yield b"\n\n"
        yield b"data: [DONE]\n\n"
        return
    base = {"id": full["id"], "object": "chat.completion.chunk", "created": full["created"], "model": full["model"]}
    for c in full["choices"]:
        deltas = [{"role": "assistant", "content": ""}]
        if c["message"].get("content"):
            deltas.append({"content": c["message"]["content"]})
        if c["message"].get("tool_calls"):
            deltas.append({"tool_calls": c["message"]["tool_calls"]})
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            chunk = {"index": c["index"], "delta": delta, "finish_reason": c["finish_reason"] if last else None,
                     "logprobs": c["logprobs"] if last else None}  # fmt: skip
            yield b"data: " + json.dumps(base | {"choices": [chunk]}).encode() + b"\n\n"
    if (body.get("stream_options") or {}).get("include_usage"):
        yield b"data: " + json.dumps(base | {"choices": [], "usage": full["usage"]}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"

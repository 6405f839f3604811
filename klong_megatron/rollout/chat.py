"""Chat engines: any OpenAI-compatible ``/v1/chat/completions`` endpoint with ``tools``, and the agent
loop that drives one (messages in, messages out).

Dataflow per turn::

    messages (OpenAI format) + ToolSet.schemas() -> POST {base_url}/v1/chat/completions
      -> assistant message (content, reasoning, tool_calls) -> each call -> tools.call (worker thread)
      -> tool messages -> ... until submit, max_turns or the deadline

Used for API models in ``klong-eval`` and (later) as teachers in Research-Factory. Unlike the token
engines (SGLang, dev server) there are no token ids or log-probs: trajectories from a chat engine are
for evaluation and SFT data, not for GRPO updates.

Errors: a connection error, timeout, HTTP 429/5xx or a reply without a message is retried with
exponential backoff up to ``max_attempts`` (then :class:`ChatEngineError`); other 4xx answers fail at
once with the server's message. A 400 that mentions the context length ends the rollout
(``context_full``). Malformed tool calls (bad JSON arguments, unknown tools) reach the model as error
observations, as in the token agent loop.

Limits: the whole conversation is sent every turn (no ContextPolicy truncation): the endpoint's own
context window bounds a rollout.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.data.trajectory import Message, ToolCall, Trajectory
from klong_megatron.rollout.agent import CONTINUE_TEXT, Exportable, Tools, _observation, _safe
from klong_megatron.rollout.manager import RolloutTask


class ChatEngineError(RuntimeError):
    """The endpoint could not serve a request (after retries for transient failures)."""


def api_message(m: Message) -> dict[str, Any]:
    """A stored message as the Chat Completions API takes it (arguments as JSON text)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id or f"call_{i}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(m.tool_calls)
        ]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id or ""
    return out


def parse_reply(data: Any) -> tuple[Message, str, dict[str, Any]]:
    """(assistant message, finish_reason, usage) of a chat.completion object; ValueError if malformed."""
    try:
        choice = data["choices"][0]
        msg = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"reply has no choices[0].message: {json.dumps(data)[:300]}") from None
    calls = []
    for i, c in enumerate(msg.get("tool_calls") or []):
        fn = c.get("function") or {}
        args = fn.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args)
        calls.append(ToolCall(str(fn.get("name") or ""), args, c.get("id") or f"call_{i}"))
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    message = Message("assistant", msg.get("content") or "", tool_calls=tuple(calls), reasoning=reasoning)
    return message, str(choice.get("finish_reason") or ""), data.get("usage") or {}


class OpenAIChatEngine:
    """Async client of one OpenAI-compatible endpoint; ``async with`` closes its connections."""

    def __init__(self, cfg: ChatEngineConfig) -> None:
        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers,
                                        timeout=httpx.Timeout(cfg.request_timeout_s, connect=10.0))  # fmt: skip
        self.retries = 0

    async def __aenter__(self) -> OpenAIChatEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.client.aclose()

    async def chat(self, messages: list[Message], tools: list[dict[str, Any]]) -> tuple[Message, str, dict[str, Any]]:
        """One completion: (assistant message, finish_reason, usage). Raises ChatEngineError."""
        c = self.cfg
        body: dict[str, Any] = {"model": c.model, "messages": [api_message(m) for m in messages], **c.extra_body}
        if tools:
            body["tools"] = tools
        if c.temperature is not None:
            body["temperature"] = c.temperature
        if c.max_tokens is not None:
            body["max_tokens"] = c.max_tokens
        last = ""
        for attempt in range(c.max_attempts):
            if attempt:
                self.retries += 1
                delay = min(c.backoff_s * 2 ** (attempt - 1), c.backoff_max_s)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                r = await self.client.post("/v1/chat/completions", json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code != 200:
                raise ChatEngineError(f"{c.base_url}: HTTP {r.status_code}: {r.text[:500]}")
            try:
                return parse_reply(r.json())
            except ValueError as e:  # includes invalid JSON
                last = f"malformed reply: {e}"
        raise ChatEngineError(f"{c.base_url}: no valid reply after {c.max_attempts} attempts; last: {last}")


@dataclass
class ChatAgentConfig:
    max_turns: int = 100
    timeout_s: float = 7200.0
    """Wall-clock budget of one rollout."""
    tool_timeout_s: float = 600.0
    export_dir: str = "rollouts/workdirs"


class ChatAgent:
    """Drives a chat engine through tool calls; ``run`` matches ``AgentLoop.run``'s signature."""

    def __init__(self, engine: OpenAIChatEngine, cfg: ChatAgentConfig) -> None:
        self.engine, self.cfg = engine, cfg

    async def run(self, task: RolloutTask, tools: Tools, workdir: Exportable | None = None) -> Trajectory:
        start = time.monotonic()
        deadline = start + self.cfg.timeout_s
        messages = list(task.messages)
        schemas = tools.schemas() if hasattr(tools, "schemas") else []
        reason, turns, gen_s, tool_s, tokens, prompt_tokens = "max_turns", 0, 0.0, 0.0, 0, 0
        for _ in range(self.cfg.max_turns):
            if time.monotonic() >= deadline:
                reason = "timed_out"
                break
            t0 = time.monotonic()
            try:
                reply, _, usage = await asyncio.wait_for(self.engine.chat(messages, schemas), deadline - t0)
            except TimeoutError:
                reason = "timed_out"
                break
            except ChatEngineError as e:
                if "HTTP 400" in str(e) and "context" in str(e).lower():
                    reason = "context_full"
                    break
                raise
            gen_s += time.monotonic() - t0
            tokens += int(usage.get("completion_tokens") or 0)
            prompt_tokens += int(usage.get("prompt_tokens") or 0)  # the whole history is re-sent every turn
            turns += 1
            messages.append(reply)
            if not reply.tool_calls:
                messages.append(Message("user", CONTINUE_TEXT))
                continue
            done = False
            for call in reply.tool_calls:
                t1 = time.monotonic()
                remaining = max(min(self.cfg.tool_timeout_s, deadline - t1), 0.001)
                try:
                    result = await asyncio.wait_for(asyncio.to_thread(tools.call, call.name, call.arguments), remaining)
                except TimeoutError:
                    reason, done = "timed_out", True
                    break
                finally:
                    tool_s += time.monotonic() - t1
                text, finished = _observation(result)
                messages.append(Message("tool", text, tool_call_id=call.id, name=call.name))
                if finished:
                    reason, done = "submitted", True
                    break
            if done:
                break
        exported = None
        if workdir is not None:
            dest = Path(self.cfg.export_dir) / _safe(task.id)
            exported = str(await asyncio.to_thread(workdir.export, dest))
        meta = {k: v for k, v in task.meta.items() if not k.startswith("_")}
        meta.update(task_id=task.task_id, sample=task.sample, finish_reason=reason, timed_out=reason == "timed_out",
                    turns=turns, tokens=tokens, prompt_tokens=prompt_tokens,
                    duration_s=round(time.monotonic() - start, 4), gen_s=round(gen_s, 4), tool_s=round(tool_s, 4),
                    workdir=exported, tools=schemas, engine="chat")  # fmt: skip
        return Trajectory(task.id, messages, meta)

"""JSON answers from any OpenAI-compatible chat endpoint, checked and repaired.

    llm = FactoryLLM(cfg)                      # one engine (connection pool) shared by every paper
    data = await llm.ask_json(system, user, check, attempts=3)

The reply's JSON (a bare object or one inside a ```json fence) goes through ``check`` (raises ValueError naming
the field); on an error the conversation continues with the error text and a request to answer again, up to
``attempts`` replies (then :class:`SchemaError`). Endpoint failures (rollout/chat.py retries transient ones)
raise ``ChatEngineError``. Token usage is summed for the run's report.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.data.trajectory import Message
from klong_megatron.rollout.chat import OpenAIChatEngine

T = TypeVar("T")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


class SchemaError(ValueError):
    """The model's answers never passed the schema check; the message has the last error."""


def parse_json(text: str) -> Any:
    """The JSON value in a reply: the first fenced block if any, else the text from its first ``{`` or ``[``."""
    m = _FENCE.search(text)
    body = m.group(1) if m else text[min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=0) :]
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"the reply is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


class FactoryLLM:
    """One chat endpoint for the factory's LLM stages, at most ``max_in_flight`` requests at once;
    ``await close()`` when done (create it inside the event loop that uses it)."""

    def __init__(self, cfg: ChatEngineConfig, max_in_flight: int = 8) -> None:
        self.engine = OpenAIChatEngine(cfg)
        self._slots = asyncio.Semaphore(max_in_flight)
        self.usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "repairs": 0}

    async def close(self) -> None:
        await self.engine.close()

    async def ask_json(self, system: str, user: str, check: Callable[[Any], T], attempts: int = 3) -> T:
        """``check(json of the reply)``, asking again with the error up to ``attempts`` replies in all."""
        messages = [Message("system", system), Message("user", user)]
        error = ""
        for i in range(attempts):
            if i:
                self.usage["repairs"] += 1
            async with self._slots:
                reply, _, usage = await self.engine.chat(messages, [])
            self.usage["calls"] += 1
            self.usage["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.usage["completion_tokens"] += int(usage.get("completion_tokens") or 0)
            try:
                return check(parse_json(reply.content))
            except ValueError as e:
                error = str(e)
            fix = f"That answer is invalid: {error}. Reply with the corrected JSON only."
            messages += [Message("assistant", reply.content), Message("user", fix)]
        raise SchemaError(f"no valid answer in {attempts} replies; last error: {error}")


def need(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``data[key]`` checked to be of ``kind`` (ValueError naming ``where.key`` otherwise)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    value = data.get(key)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ValueError(f"{where}.{key} must be {getattr(kind, '__name__', kind)}, got {value!r}"[:300])
    return value

"""Client for a pool of OpenAI-compatible chat endpoints (``POST {url}/v1/chat/completions``).

Dataflow: ``chat(messages, priority)`` -> pick the healthy endpoint with the most free capacity ->
wait for one of its slots (a priority semaphore: eval requests are served before train requests) ->
HTTP request -> reply text. A connection error, timeout or 5xx marks the endpoint down for
``cooldown_s`` and the request fails over to the next endpoint; when every endpoint failed, a
:class:`TransientChatError` is raised for the caller to retry with backoff. A 4xx other than 429 is a
:class:`ChatError` (the request itself is wrong; retrying it elsewhere would not help).

Works with SGLang's and vLLM's OpenAI-compatible servers and any other server speaking that protocol.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from klong_megatron.judge.base import PRIORITIES


class ChatError(RuntimeError):
    """The endpoint rejected the request (4xx) or answered something that is not a chat completion."""


class TransientChatError(ChatError):
    """Every endpoint failed for a reason that may pass (connection, timeout, 5xx, 429)."""


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: the answer text, the reasoning text a server's reasoning parser split off (kept
    apart so that it never reaches a score parser), and the token usage the server reported (0 if none)."""

    content: str
    reasoning: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PrioritySemaphore:
    """A semaphore whose waiters are woken lowest ``priority`` first (FIFO within a priority)."""

    def __init__(self, value: int) -> None:
        self._value = value
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for _, _, f in self._waiters)

    async def acquire(self, priority: int = 0) -> None:
        if self._value > 0 and not self._waiters:
            self._value -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._value += 1


@dataclass
class Endpoint:
    url: str
    slots: PrioritySemaphore
    capacity: int
    in_flight: int = 0
    down_until: float = 0.0
    requests: int = 0
    failures: int = 0
    last_error: str = ""

    def load(self) -> float:
        return (self.in_flight + self.slots.waiting) / self.capacity


@dataclass
class ChatPool:
    """Round the requests over ``urls`` with at most ``max_concurrency`` in flight per endpoint."""

    urls: Sequence[str]
    model: str
    api_key: str | None = None
    max_concurrency: int = 16
    timeout_s: float = 600.0
    cooldown_s: float = 10.0
    endpoints: list[Endpoint] = field(init=False)
    failovers: int = field(init=False, default=0)
    _client: httpx.AsyncClient | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("ChatPool needs at least one endpoint url")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        self.endpoints = [
            Endpoint(_base(u), PrioritySemaphore(self.max_concurrency), self.max_concurrency) for u in self.urls
        ]

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            n = self.max_concurrency * len(self.endpoints)
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s,
                headers=headers,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _order(self) -> list[Endpoint]:
        """Healthy endpoints by load, then the down ones by how soon they come back."""
        now = time.monotonic()
        up = sorted((e for e in self.endpoints if e.down_until <= now), key=Endpoint.load)
        down = sorted((e for e in self.endpoints if e.down_until > now), key=lambda e: e.down_until)
        return up + down

    async def chat(self, messages: list[dict[str, str]], *, priority: str = "train", **params: Any) -> str:
        """The reply text (``choices[0].message.content``) of one chat completion (see :meth:`complete`)."""
        return (await self.complete(messages, priority=priority, **params)).content

    async def complete(self, messages: list[dict[str, str]], *, priority: str = "train", **params: Any) -> ChatReply:
        """One chat completion with its usage.

        ``params`` go into the request body (temperature, max_tokens, reasoning_effort, response_format, ...).
        """
        rank = PRIORITIES.index(priority)
        body = {"model": self.model, "messages": messages, **params}
        errors = []
        for i, ep in enumerate(self._order()):
            if i:
                self.failovers += 1
            try:
                return await self._post(ep, body, rank)
            except TransientChatError as e:
                errors.append(f"{ep.url}: {e}")
        raise TransientChatError("all judge endpoints failed: " + "; ".join(errors))

    async def _post(self, ep: Endpoint, body: dict[str, Any], rank: int) -> ChatReply:
        await ep.slots.acquire(rank)
        ep.in_flight += 1
        ep.requests += 1
        try:
            try:
                resp = await self._http().post(f"{ep.url}/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                raise self._down(ep, f"{type(e).__name__}: {e}") from None
            if resp.status_code >= 500:
                raise self._down(ep, f"HTTP {resp.status_code}: {resp.text[:200]}")
            if resp.status_code == 429:
                raise TransientChatError(f"HTTP 429: {resp.text[:200]}")
            if resp.status_code >= 400:
                raise ChatError(f"{ep.url}: HTTP {resp.status_code}: {resp.text[:500]}")
            try:
                data = resp.json()
                message = data["choices"][0]["message"]
                content = message.get("content")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                raise TransientChatError(f"not a chat completion: {resp.text[:200]!r}") from None
            usage = data.get("usage") or {}
            return ChatReply(
                content if isinstance(content, str) else "",
                message.get("reasoning_content") or "",
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            )
        finally:
            ep.in_flight -= 1
            ep.slots.release()

    def _down(self, ep: Endpoint, why: str) -> TransientChatError:
        ep.failures += 1
        ep.last_error = why
        ep.down_until = time.monotonic() + self.cooldown_s
        return TransientChatError(why)

    def metrics(self) -> dict[str, float]:
        now = time.monotonic()
        out: dict[str, float] = {"judge/endpoint_failovers": self.failovers}
        for i, e in enumerate(self.endpoints):
            out[f"judge/endpoint{i}_in_flight"] = e.in_flight
            out[f"judge/endpoint{i}_waiting"] = e.slots.waiting
            out[f"judge/endpoint{i}_failures"] = e.failures
            out[f"judge/endpoint{i}_up"] = float(e.down_until <= now)
        return out


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url

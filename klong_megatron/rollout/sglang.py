"""HTTP client for SGLang's native API, routing over several servers.

Dataflow: ``generate(ids)`` -> pick the healthy server with the fewest in-flight requests ->
POST ``/generate`` {input_ids, sampling_params, return_logprob} -> parse ``output_ids``,
``meta_info.output_token_logprobs`` ([logprob, token_id, text] triples) and
``meta_info.finish_reason.type``. A connection error, timeout or 5xx marks that server down for
``cooldown_s`` and the request is retried from scratch on another one (generation is stateless),
up to ``max_attempts`` servers; then ``EngineError``. Every call has a timeout; no call waits forever.

Works against real SGLang servers and against ``klong-devserver`` (same contract tests).

Limits: one prompt per request; the broadcast weight path (``WeightUpdate(names=...)``) needs the
trainer to broadcast the tensors concurrently (``rl/weight_sync.py``); it is tested over gloo against
``klong-devserver``, NCCL against SGLang only runs on GPU clusters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from klong_megatron.rollout.engine import EngineError, Generation, SamplingParams, WeightUpdate

log = logging.getLogger(__name__)

_RETRYABLE = (httpx.TransportError, httpx.TimeoutException)


@dataclass
class _Server:
    url: str
    client: httpx.AsyncClient
    slots: asyncio.Semaphore
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0
    served: int = 0
    rank_offset: int | None = None
    groups: set[str] = field(default_factory=set)

    def up(self, now: float) -> bool:
        return self.down_until <= now


class SGLangEngine:
    """``Engine`` over one or more SGLang-compatible HTTP servers (least-loaded routing, fail-over).

    ``request_timeout_s`` bounds one ``/generate`` (read timeout); ``connect_timeout_s`` bounds
    connecting; ``max_inflight`` bounds concurrent requests per server (extra callers queue).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
        control_timeout_s: float = 60.0,
        max_inflight: int = 64,
        max_attempts: int = 3,
        cooldown_s: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("SGLangEngine needs at least one server url (rollout.servers is empty)")
        if max_inflight < 1 or max_attempts < 1:
            raise ValueError(f"max_inflight and max_attempts must be >= 1, got {max_inflight}, {max_attempts}")
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self.max_attempts = max_attempts
        self.cooldown_s = cooldown_s
        self._timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        limits = httpx.Limits(max_connections=max_inflight + 4, max_keepalive_connections=max_inflight + 4)
        self.servers = [
            _Server(
                url=u.rstrip("/"),
                client=httpx.AsyncClient(base_url=u.rstrip("/"), timeout=self._timeout, limits=limits),
                slots=asyncio.Semaphore(max_inflight),
            )
            for u in urls
        ]
        self._rr = itertools.count()

    # ------------------------------------------------------------------ routing
    def _pick(self, exclude: set[str]) -> _Server | None:
        now = time.monotonic()
        live = [s for s in self.servers if s.url not in exclude and s.up(now)]
        if not live:
            # every server is cooling down: try the one whose cooldown ends first rather than fail
            live = sorted((s for s in self.servers if s.url not in exclude), key=lambda s: s.down_until)[:1]
        if not live:
            return None
        least = min(s.inflight for s in live)
        ties = [s for s in live if s.inflight == least]
        return ties[next(self._rr) % len(ties)]

    def _mark_down(self, server: _Server, why: str) -> None:
        server.failures += 1
        server.down_until = time.monotonic() + self.cooldown_s
        log.warning("sglang server %s marked down for %.0fs: %s", server.url, self.cooldown_s, why)

    # ------------------------------------------------------------------ Engine
    async def generate(self, input_ids: list[int], sampling: SamplingParams) -> Generation:
        """One completion; retried on another server when a server fails. Raises EngineError."""
        if not input_ids:
            raise ValueError("generate: input_ids is empty")
        payload = {
            "input_ids": [int(t) for t in input_ids],
            "sampling_params": sampling.to_sglang(),
            "return_logprob": True,
            "rid": uuid.uuid4().hex,
        }
        tried: set[str] = set()
        errors: list[str] = []
        for _ in range(min(self.max_attempts, len(self.servers))):
            server = self._pick(tried)
            if server is None:
                break
            tried.add(server.url)
            server.inflight += 1
            try:
                async with server.slots:
                    resp = await server.client.post("/generate", json=payload)
                if resp.status_code >= 500:
                    raise httpx.TransportError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                if resp.status_code != 200:
                    raise EngineError(
                        f"{server.url}/generate rejected the request: {resp.status_code} {resp.text[:300]}"
                    )
                server.served += 1
                return parse_generate_reply(resp.json(), server=server.url)
            except _RETRYABLE as e:
                self._mark_down(server, f"{type(e).__name__}: {e}")
                errors.append(f"{server.url}: {type(e).__name__}: {e}")
            finally:
                server.inflight -= 1
        raise EngineError(f"generate failed on {len(tried)} server(s): " + "; ".join(errors or ["no server available"]))

    async def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> list[httpx.Response]:
        """Send one control call to every server concurrently; raise EngineError naming failed servers."""

        async def one(s: _Server) -> httpx.Response:
            try:
                return await s.client.request(method, path, json=body, timeout=self.control_timeout_s)
            except _RETRYABLE as e:
                self._mark_down(s, f"{path}: {type(e).__name__}")
                raise EngineError(f"{s.url}{path}: {type(e).__name__}: {e}") from e

        results = await asyncio.gather(*(one(s) for s in self.servers), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        errors += [f"{r.request.url}: HTTP {r.status_code} {r.text[:200]}" for r in results if _bad(r)]
        if errors:
            raise EngineError(f"{path} failed: " + "; ".join(errors))
        return [r for r in results if isinstance(r, httpx.Response)]

    async def abort(self) -> None:
        await self._control("POST", "/abort_request", {"rid": "", "abort_all": True})

    async def flush_cache(self) -> None:
        await self._control("POST", "/flush_cache")

    async def health(self) -> bool:
        """True when at least one server answers ``/health_generate``; refreshes each server's state."""

        async def one(s: _Server) -> bool:
            try:
                r = await s.client.get("/health_generate", timeout=self.control_timeout_s)
            except _RETRYABLE:
                r = None
            if r is not None and r.status_code == 200:
                s.down_until = 0.0
                return True
            self._mark_down(s, "health check failed")
            return False

        return any(await asyncio.gather(*(one(s) for s in self.servers)))

    async def update_weights(self, update: WeightUpdate) -> None:
        """Disk path on every server, or the NCCL path (join the group once, then receive tensors)."""
        if update.path is not None:
            body = {"model_path": update.path, "weight_version": update.version, "abort_all_requests": False}
            await self._control("POST", "/update_weights_from_disk", body)
            return
        await self._join_group(update)
        body = {
            "names": list(update.names),
            "dtypes": list(update.dtypes),
            "shapes": [list(s) for s in update.shapes],
            "group_name": update.group_name,
            "weight_version": update.version,
            "flush_cache": True,
        }
        await self._control("POST", "/update_weights_from_distributed", body)

    async def _join_group(self, update: WeightUpdate) -> None:
        """Rank 0 is the trainer; each server takes ``tp_size`` consecutive ranks after it."""
        pending = [s for s in self.servers if update.group_name not in s.groups]
        if not pending:
            return
        offset = 1
        for s in self.servers:
            info = (await s.client.get("/get_server_info", timeout=self.control_timeout_s)).json()
            s.rank_offset = offset
            offset += int(info.get("tp_size", 1))

        async def one(s: _Server) -> None:
            body = {
                "master_address": update.master_address,
                "master_port": update.master_port,
                "rank_offset": s.rank_offset,
                "world_size": update.world_size,
                "group_name": update.group_name,
                "backend": update.backend,
            }
            r = await s.client.post("/init_weights_update_group", json=body, timeout=self.control_timeout_s)
            if _bad(r):
                raise EngineError(f"{s.url}/init_weights_update_group: {r.status_code} {r.text[:200]}")
            s.groups.add(update.group_name)

        await asyncio.gather(*(one(s) for s in pending))

    async def close(self) -> None:
        await asyncio.gather(*(s.client.aclose() for s in self.servers))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-server counters: requests served, failures, in flight now."""
        return {s.url: {"served": s.served, "failures": s.failures, "inflight": s.inflight} for s in self.servers}


def _bad(r: object) -> bool:
    """A non-2xx reply, or a 200 whose JSON body says ``success: false`` (SGLang's weight APIs)."""
    if not isinstance(r, httpx.Response):
        return False
    if r.status_code // 100 != 2:
        return True
    if "application/json" in r.headers.get("content-type", ""):
        body = r.json()
        return isinstance(body, dict) and body.get("success") is False
    return False


def parse_generate_reply(body: dict[str, Any], *, server: str = "") -> Generation:
    """SGLang ``/generate`` reply -> Generation. Raises EngineError naming the missing field."""
    try:
        meta = body["meta_info"]
        triples = meta["output_token_logprobs"]
        reason = meta["finish_reason"]
    except (KeyError, TypeError) as e:
        raise EngineError(f"{server}/generate reply lacks {e} (was return_logprob honoured?)") from e
    ids = [int(t[1]) for t in triples]
    logprobs = [float(t[0]) for t in triples]
    if "output_ids" in body and list(body["output_ids"]) != ids:
        raise EngineError(f"{server}/generate: output_ids disagree with output_token_logprobs")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length", "abort"):
        raise EngineError(f"{server}/generate: unknown finish_reason {reason!r}")
    return Generation(
        output_ids=ids,
        output_logprobs=logprobs,
        finish_reason=kind,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        weight_version=str(meta.get("weight_version", "")),
        server=server,
        meta={"e2e_latency": meta.get("e2e_latency"), "cached_tokens": meta.get("cached_tokens")},
    )

"""HTTP client for SGLang's native API, routing over several servers.

Dataflow: ``generate(ids)`` -> pick the healthy server with the fewest in-flight requests ->
POST ``/generate`` {input_ids, sampling_params, return_logprob} -> parse ``output_ids``,
``meta_info.output_token_logprobs`` ([logprob, token_id, text] triples) and
``meta_info.finish_reason.type``. A connection error, timeout or 5xx marks that server down for
``cooldown_s`` and the request is retried from scratch on another one (generation is stateless),
up to ``max_attempts`` servers; then ``EngineError``. Every call has a timeout; no call waits forever.

Works against real SGLang servers and against ``klong-devserver`` (same contract tests).

Weight updates follow SGLang 0.5.23's protocol (``srt/entrypoints/http_server.py``,
``srt/managers/scheduler_components/weight_updater.py``): ``pause_generation(mode)`` -> (distributed:
``begin_weight_update`` -> one ``update_weights_from_distributed`` per bucket -> ``end_weight_update``;
disk: ``update_weights_from_disk``) -> ``flush_cache`` (not after an ``in_place`` pause, where SGLang
refuses it) -> ``continue_generation`` -> every server's ``/model_info`` ``weight_version`` checked.
A 404 on begin/end or pause/continue means an older server: the step is skipped (logged once).
Control calls are bounded by ``control_timeout_s``, weight calls by ``weight_timeout_s``.
A generation aborted by a weight update (``finish_reason`` abort while the engine was pausing) is
re-queued: it waits for ``continue_generation`` and is sent again, so no turn is lost.

Limits: one prompt per request; the broadcast path needs the trainer to broadcast the tensors
concurrently (``rl/weight_sync.py``); it is tested over gloo against ``klong-devserver``, NCCL against
SGLang only runs on GPU clusters. Servers with ``pp_size`` or ``dp_size`` > 1 are refused for the
broadcast path: SGLang joins the group as ``rank_offset + tp_rank`` (``model_runner_components/
weight_updater.py``), so their ranks would collide, and it asserts ``dp_size == 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from klong_megatron.rollout.engine import PAUSE_MODES, EngineError, Generation, SamplingParams, WeightUpdate

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
        weight_timeout_s: float = 600.0,
        pause_mode: str = "abort",
        max_inflight: int = 64,
        max_attempts: int = 3,
        cooldown_s: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("SGLangEngine needs at least one server url (rollout.servers is empty)")
        if max_inflight < 1 or max_attempts < 1:
            raise ValueError(f"max_inflight and max_attempts must be >= 1, got {max_inflight}, {max_attempts}")
        self.request_timeout_s = request_timeout_s
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be one of {PAUSE_MODES}, got {pause_mode!r}")
        self.control_timeout_s = control_timeout_s
        self.weight_timeout_s = weight_timeout_s
        self.pause_mode = pause_mode
        self._open: asyncio.Event | None = None  # cleared while a weight update pauses generation
        self._update_epoch = 0  # +1 at every pause: an abort seen across it is re-queued
        self.requeued = 0
        self._missing: set[str] = set()  # control paths a server answered 404 (older server)
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
        while True:
            await self._gate().wait()  # held while a weight update runs
            epoch = self._update_epoch
            g = await self._generate_once(payload)
            if g.finish_reason != "abort" or (epoch == self._update_epoch and self._gate().is_set()):
                return g
            self.requeued += 1  # aborted by a weight update: send it again once generation continues
            payload = payload | {"rid": uuid.uuid4().hex}

    def _gate(self) -> asyncio.Event:
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        return self._open

    async def _generate_once(self, payload: dict[str, Any]) -> Generation:
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

    async def _control(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        optional: bool = False,
    ) -> list[httpx.Response]:
        """Send one control call to every server concurrently; raise EngineError naming failed servers.

        ``optional``: a 404 (an older server without this route) is not an error; the reply is kept."""

        async def one(s: _Server) -> httpx.Response:
            try:
                r = await s.client.request(method, path, json=body, timeout=timeout or self.control_timeout_s)
                if optional and r.status_code == 404 and path not in self._missing:
                    self._missing.add(path)
                    log.warning("%s%s: 404, an older server: skipping this step", s.url, path)
                return r
            except _RETRYABLE as e:
                self._mark_down(s, f"{path}: {type(e).__name__}")
                raise EngineError(f"{s.url}{path}: {type(e).__name__}: {e}") from e

        results = await asyncio.gather(*(one(s) for s in self.servers), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        old = [r for r in results if optional and isinstance(r, httpx.Response) and r.status_code == 404]
        errors += [f"{r.request.url}: HTTP {r.status_code} {r.text[:300]}" for r in results
                   if _bad(r) and r not in old]  # fmt: skip
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

    # ------------------------------------------------------------------ weight updates (SGLang's protocol)
    async def pause(self) -> None:
        """``/pause_generation`` (``pause_mode``) on every server; new generate calls wait for :meth:`resume`."""
        self._gate().clear()
        self._update_epoch += 1
        await self._control("POST", "/pause_generation", {"mode": self.pause_mode}, optional=True)
        if "/pause_generation" in self._missing and self.pause_mode == "abort":
            await self.abort()  # an older server: abort what runs (the aborted turns are re-queued)

    async def resume(self) -> None:
        """``/continue_generation`` on every server, then release the waiting generate calls."""
        try:
            await self._control("POST", "/continue_generation", {}, optional=True)
        finally:
            self._gate().set()

    async def begin_weight_update(self) -> bool:
        """Open SGLang's weight-update session; False for an older server without the route (404)."""
        rs = await self._control("POST", "/begin_weight_update", {}, timeout=self.weight_timeout_s, optional=True)
        return all(r.status_code != 404 for r in rs)

    async def end_weight_update(self) -> None:
        await self._control("POST", "/end_weight_update", {}, timeout=self.weight_timeout_s, optional=True)

    async def update_weights_from_distributed(self, update: WeightUpdate, *, last: bool) -> None:
        """One bucket: every server receives ``update.names`` (the trainer broadcasts them concurrently).

        The version and the cache flush ride on the last bucket only (``flush_cache`` off after an
        ``in_place`` pause, where SGLang would answer 400 because requests still hold KV cache)."""
        body = {
            "names": list(update.names),
            "dtypes": list(update.dtypes),
            "shapes": [list(s) for s in update.shapes],
            "group_name": update.group_name,
            "weight_version": update.version if last else None,
            "flush_cache": last and self.pause_mode != "in_place",
        }
        await self._control("POST", "/update_weights_from_distributed", body, timeout=self.weight_timeout_s)

    async def update_weights(self, update: WeightUpdate) -> None:
        """Disk path on every server: pause -> ``/update_weights_from_disk`` -> resume -> version check.

        The broadcast path is driven by ``rl/weight_sync.py`` (it must broadcast while the servers receive)."""
        if update.path is None:
            raise ValueError("SGLangEngine.update_weights takes disk updates; broadcast with rl.weight_sync")
        await self.pause()
        try:
            body = {"model_path": update.path, "weight_version": update.version, "abort_all_requests": False,
                    "flush_cache": self.pause_mode != "in_place"}  # fmt: skip
            await self._control("POST", "/update_weights_from_disk", body, timeout=self.weight_timeout_s)
        except BaseException:  # cancelled too: resume what can be resumed, keep the original error
            with contextlib.suppress(Exception):
                await self.resume()
            raise
        await self.resume()
        await self.check_version(update.version)

    async def check_version(self, version: str) -> None:
        """Every server reports ``weight_version == version`` (``/model_info``); EngineError names the others."""
        rs = await self._control("GET", "/model_info", optional=True)
        if any(r.status_code == 404 for r in rs):
            rs = await self._control("GET", "/get_model_info")
        wrong = [f"{r.request.url}: {r.json().get('weight_version')!r}" for r in rs
                 if str(r.json().get("weight_version")) != str(version)]  # fmt: skip
        if wrong:
            raise EngineError(f"after the update to weight_version {version!r} servers report: " + "; ".join(wrong))

    async def server_infos(self) -> list[dict[str, Any]]:
        """Every server's ``/server_info`` (``/get_server_info`` on older servers), in ``servers`` order."""
        rs = await self._control("GET", "/server_info", optional=True)
        if any(r.status_code == 404 for r in rs):
            rs = await self._control("GET", "/get_server_info")
        return [r.json() for r in rs]

    async def weight_checksums(self) -> list[dict[str, Any]]:
        """Every server's ``/weights_checker`` ``checksum`` reply (``ranks``, ``per_engine_checksum``)."""
        rs = await self._control("POST", "/weights_checker", {"action": "checksum"}, timeout=self.weight_timeout_s)
        return [r.json() for r in rs]

    async def join_group(self, update: WeightUpdate, tp_sizes: list[int]) -> None:
        """Rank 0 is the trainer; server i joins as ranks ``1 + sum(tp_sizes[:i]) ..`` (first push only)."""
        offset = 1
        for s, tp in zip(self.servers, tp_sizes, strict=True):
            s.rank_offset, offset = offset, offset + tp
        pending = [s for s in self.servers if update.group_name not in s.groups]

        async def one(s: _Server) -> None:
            body = {
                "master_address": update.master_address,
                "master_port": update.master_port,
                "rank_offset": s.rank_offset,
                "world_size": update.world_size,
                "group_name": update.group_name,
                "backend": update.backend,
            }
            r = await s.client.post("/init_weights_update_group", json=body, timeout=self.weight_timeout_s)
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

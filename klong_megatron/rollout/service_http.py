"""HTTP control of a rollout service in another process (``klong-rollout-service``).

The data travels on the shared file system (``rollouts.jsonl`` + ``groups.jsonl``, ``rollout/service.py``);
HTTP carries only the consumer's progress and the service's counters (JSON bodies)::

    GET  /health   -> 200 {"ok": true}
    GET  /status   -> 200 RolloutService.status()
    POST /control  {"stage": int | null, "taken": int | null} -> 200 status after applying it
                   (idempotent: lower values than already seen are ignored, so a restarted trainer
                   repeats its last control safely); a malformed body -> 400 {"error": text}

``ServiceClient`` is the trainer's side: the in-process service's ``control`` (and ``status`` as a call),
retried while the service is down (a restart) for up to ``down_s`` seconds, then an error naming the URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from klong_megatron.rollout.service import RolloutService

log = logging.getLogger(__name__)


def serve(service: RolloutService, loop: asyncio.AbstractEventLoop, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving ``service`` (running on ``loop``) in a daemon thread; ``server.server_address`` is
    where it listens (port 0: a free one)."""

    def call(coro: Any) -> dict[str, Any]:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    async def status() -> dict[str, Any]:
        return service.status()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # no line per request on stderr
            log.debug(fmt, *args)

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"ok": True})
            elif self.path == "/status":
                self._send(200, call(status()))
            else:
                self._send(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/control":
                self._send(404, {"error": f"no such endpoint: POST {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                stage, taken = body.get("stage"), body.get("taken")
                for name, value in (("stage", stage), ("taken", taken)):
                    if value is not None and (not isinstance(value, int) or value < 0):
                        raise ValueError(f"field {name!r}: expected a non-negative integer or null, got {value!r}")
            except (ValueError, AttributeError) as e:
                self._send(400, {"error": f"/control: {e}"})
                return
            self._send(200, call(service.control(stage=stage, taken=taken)))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class ServiceClient:
    """``control`` / ``status`` of a rollout service at ``url``, waiting out a restart of up to ``down_s``."""

    def __init__(self, url: str, *, down_s: float = 600.0, retry_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.down_s, self.retry_s = down_s, retry_s
        self._client = httpx.AsyncClient(timeout=30.0)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + self.down_s
        while True:
            try:
                r = await self._client.request(method, f"{self.url}{path}", json=body)
            except httpx.TransportError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rollout service {self.url} unreachable for {self.down_s:.0f} s: {e}") from e
                log.warning("rollout service %s unreachable (%s); retrying", self.url, type(e).__name__)
                await asyncio.sleep(self.retry_s)
                continue
            if r.status_code != 200:
                raise RuntimeError(f"rollout service {self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
            return r.json()

    async def control(self, stage: int | None = None, taken: int | None = None) -> dict[str, Any]:
        return await self._call("POST", "/control", {"stage": stage, "taken": taken})

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/status")

    async def close(self) -> None:
        await self._client.aclose()

"""Egress allow-list for ``network=allowlist``: an HTTP(S) proxy on the host that only forwards to listed hosts.

Dataflow: the sandbox keeps no network beyond its own loopback. ``forwarder.py`` (run inside the sandbox
by the sandbox's python3) listens on ``127.0.0.1:PROXY_PORT`` and relays each connection over a unix
socket, bind-mounted from the host, to an ``EgressProxy`` running here on one shared event-loop thread.
The proxy reads one request head: ``CONNECT host:port`` (https, or any TLS/TCP tunnel) or an absolute
``http://host[:port]/path`` request (forwarded in origin form with ``Connection: close``). A target on the
allow-list is connected from the host; anything else gets ``403`` naming the allow-list and is recorded
in ``refusals`` (and logged). Programs find the proxy through HTTP(S)_PROXY; ``NO_PROXY`` keeps the
sandbox's own loopback direct.

Why a unix socket: with the engine run as ``dockerd --iptables=false`` (no NAT, as on many clusters), even an
``--internal`` Docker network gives containers a default route to every host service bound to 0.0.0.0
(measured: both the gateway and the host's own address answered). A container with ``--network none``
plus one bind-mounted socket has exactly one way out, and the same design works for bubblewrap.

Limits: only HTTP proxy clients get out (pip, apt, curl, urllib, git over https); a program ignoring the
proxy variables has no route at all. Host names are resolved on the host, so the allow-list matches the
name the client asked for (an IP literal must be listed as such). The unix socket must be reachable by
the Docker engine's filesystem (a local engine, as on cluster nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from klong_megatron.config.sandbox import parse_allow_entry
from klong_megatron.sandbox._common import SandboxError

log = logging.getLogger(__name__)

PROXY_PORT = 3128
"""Port of the in-sandbox forwarder on the sandbox's loopback."""
NET_DIR = "/run/klong-net"
"""Where the host directory with the proxy socket and forwarder.py is mounted (read-only) in the sandbox."""
SOCKET_NAME = "proxy.sock"
FORWARDER = Path(__file__).with_name("forwarder.py")
HEAD_LIMIT = 64 * 1024
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
WEB_PORTS = (80, 443)
_DROP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive"}


def forwarder_argv(*mode: str) -> list[str]:
    """The in-sandbox forwarder's command line; ``mode``: ``"--init"`` or ``"--", *cmd``."""
    return ["python3", "-I", "-S", f"{NET_DIR}/{FORWARDER.name}", str(PROXY_PORT), f"{NET_DIR}/{SOCKET_NAME}", *mode]


def proxy_env(pip_index_url: str | None = None) -> dict[str, str]:
    """Environment that points HTTP clients in the sandbox at the forwarder (both spellings of each name)."""
    url = f"http://127.0.0.1:{PROXY_PORT}"
    env = {}
    for name, value in (("http_proxy", url), ("https_proxy", url), ("no_proxy", "localhost,127.0.0.1,::1")):
        env[name] = env[name.upper()] = value
    if pip_index_url:
        env["PIP_INDEX_URL"] = pip_index_url
        parts = urlsplit(pip_index_url)
        if parts.scheme == "http" and parts.hostname:
            env["PIP_TRUSTED_HOST"] = parts.hostname
    return env


class AllowList:
    """Parsed ``host[:port]`` rules; ``permits`` is the only question the proxy asks."""

    def __init__(self, entries: list[str]) -> None:
        self.entries = list(entries)
        self._rules = [parse_allow_entry(e) for e in entries]

    def permits(self, host: str, port: int) -> bool:
        host = host.strip("[]").lower().rstrip(".")
        for rule_host, rule_port in self._rules:
            if port not in ((rule_port,) if rule_port is not None else WEB_PORTS):
                continue
            if rule_host.startswith("*.") and host.endswith(rule_host[1:]) and len(host) > len(rule_host) - 1:
                return True
            if host == rule_host:
                return True
        return False


@dataclass(frozen=True)
class Refusal:
    """A request the proxy did not forward. ``port`` is 0 when the request could not be parsed."""

    host: str
    port: int
    method: str
    reason: str
    time: float


class _Loop:
    """One event loop on a daemon thread serves every proxy of the process (re-created after a fork)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _pid = 0
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="klong-egress", daemon=True).start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


class EgressProxy:
    """Allow-list proxy on ``net_dir/proxy.sock``; ``net_dir`` also holds the forwarder the sandbox runs.

    ``start``/``close`` may be called from any thread; ``close`` removes ``net_dir``.
    """

    def __init__(self, allow: list[str], net_dir: str | Path, name: str = "") -> None:
        self.allow = AllowList(allow)
        self.net_dir = Path(net_dir)
        self.socket_path = self.net_dir / SOCKET_NAME
        self.name = name or self.net_dir.name
        self.refusals: list[Refusal] = []
        self.forwarded = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        if len(str(self.socket_path).encode()) > 107:
            raise SandboxError(f"sandbox {self.name}: egress socket path too long for AF_UNIX: {self.socket_path}")
        self.net_dir.mkdir(parents=True, exist_ok=True)
        self.net_dir.chmod(0o755)  # world-searchable: bwrap's per-sandbox uid and remapped container roots
        shutil.copyfile(FORWARDER, self.net_dir / FORWARDER.name)
        (self.net_dir / FORWARDER.name).chmod(0o644)
        serve = asyncio.start_unix_server(self._serve, path=str(self.socket_path), limit=HEAD_LIMIT)
        try:
            self._server = asyncio.run_coroutine_threadsafe(serve, _Loop.get()).result(timeout=10)
        except OSError as e:
            raise SandboxError(f"sandbox {self.name}: cannot start the egress proxy at {self.socket_path}: {e}") from e
        self.socket_path.chmod(0o666)

    def close(self) -> None:
        """Stop listening, cut every open connection and remove ``net_dir`` (idempotent)."""
        server, self._server = self._server, None
        if server is not None:

            async def stop() -> None:
                server.close()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), _Loop.get()).result(timeout=10)
        shutil.rmtree(self.net_dir, ignore_errors=True)

    # -- one client connection (on the loop thread) ------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            self._refuse("", 0, "?", f"request head over {HEAD_LIMIT} bytes")
            return await self._reply(writer, 431, "request head too large")
        request_line, *headers = head[:-4].decode("latin-1").split("\r\n")
        try:
            method, target, version = request_line.split(" ")
            host, port, first = _route(method, target, version, headers)
        except ValueError as e:
            self._refuse("", 0, request_line[:80], f"bad request: {e}")
            return await self._reply(writer, 400, f"bad proxy request: {e}")
        if not self.allow.permits(host, port):
            self._refuse(host, port, method, "not on the allow-list")
            allowed = ", ".join(self.allow.entries)
            return await self._reply(writer, 403, f"{host}:{port} is not on this sandbox's allow-list ({allowed})")
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            log.info("sandbox %s: egress to %s:%d failed: %s", self.name, host, port, e)
            return await self._reply(writer, 502, f"cannot connect to {host}:{port}: {e}")
        self.forwarded += 1
        if first is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_w.write(first)
        try:
            await _relay(reader, writer, up_r, up_w)
        finally:
            up_w.close()

    def _refuse(self, host: str, port: int, method: str, reason: str) -> None:
        self.refusals.append(Refusal(host, port, method, reason, time.time()))
        log.warning("sandbox %s: egress refused: %s %s:%d (%s)", self.name, method, host, port, reason)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, text: str) -> None:
        reason = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}
        body = f"klong egress proxy: {text}\n".encode()
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()


def _route(method: str, target: str, version: str, headers: list[str]) -> tuple[str, int, bytes | None]:
    """(host, port, request head to send upstream; None for a CONNECT tunnel). Raises ValueError."""
    if not version.startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line ({version!r})")
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"CONNECT needs host:port, got {target!r}")
        return host.strip("[]"), int(port), None
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"expected CONNECT or an absolute http:// URL, got {target[:80]!r}")
    port = url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [h for h in headers if h.partition(":")[0].strip().lower() not in _DROP_HEADERS]
    if not any(h.lower().startswith("host:") for h in kept):
        kept.insert(0, f"Host: {url.netloc}")
    lines = [f"{method} {path} {version}", *kept, "Connection: close", "", ""]
    return url.hostname, port, "\r\n".join(lines).encode("latin-1")


async def _relay(
    c_r: asyncio.StreamReader, c_w: asyncio.StreamWriter, u_r: asyncio.StreamReader, u_w: asyncio.StreamWriter
) -> None:
    """Copy both ways; client EOF half-closes upstream, upstream EOF ends the exchange."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            with contextlib.suppress(OSError):
                dst.write_eof()

    up = asyncio.ensure_future(pump(c_r, u_w))
    try:
        await pump(u_r, c_w)
    finally:
        up.cancel()
        await asyncio.gather(up, return_exceptions=True)

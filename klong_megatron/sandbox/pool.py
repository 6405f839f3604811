"""A pool of pre-started sandboxes for concurrent rollouts.

Dataflow: start() starts ``size`` sandboxes in parallel -> acquire() hands out a ready one after a
health check (a dead one is reported, closed and replaced) -> release() closes it (a sandbox never
serves two rollouts: the next task must not see the last one's files) and starts a replacement in
the background. close() (also on exit of ``with``) closes every sandbox, idle or handed out, so an
exception in a rollout leaves nothing behind, and wakes every acquire() still waiting (it raises); a
crash of the whole process is covered by the backends' reapers (labelled containers, pid-named work dirs).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Self

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.sandbox import make_sandbox
from klong_megatron.sandbox._common import SandboxError
from klong_megatron.sandbox.base import Sandbox

log = logging.getLogger(__name__)

_CLOSED = object()
"""Put in the ready queue by ``close``: wakes every ``acquire`` still waiting (each puts it back)."""


class SandboxPool:
    """``size`` ready sandboxes of one config; thread-safe."""

    def __init__(
        self,
        cfg: SandboxConfig,
        size: int,
        *,
        factory: Callable[[SandboxConfig], Sandbox] = make_sandbox,
        start_attempts: int = 3,
        health_timeout_s: float = 30.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if start_attempts < 1:
            raise ValueError(f"start_attempts must be >= 1, got {start_attempts}")
        self.cfg, self.size, self.factory = cfg, size, factory
        self.start_attempts, self.health_timeout_s = start_attempts, health_timeout_s
        self._ready: queue.Queue[Any] = queue.Queue()  # ready sandboxes, then _CLOSED
        self._all: set[int] = set()
        self._owned: dict[int, Sandbox] = {}
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(max_workers=min(size, 8), thread_name_prefix="sandbox-pool")
        self._closed = False
        self.replaced = 0
        """How many sandboxes were found dead and replaced (for logs and metrics)."""

    def start(self) -> None:
        """Start all sandboxes (in parallel); raises if one cannot be started after the retries."""
        for fut in [self._workers.submit(self._start_one) for _ in range(self.size)]:
            fut.result()

    def _start_one(self) -> None:
        last: Exception | None = None
        for attempt in range(1, self.start_attempts + 1):
            if self._closed:
                return
            sb = self.factory(self.cfg)
            try:
                sb.start()
            except Exception as e:  # any backend failure: report, clean up, retry
                last = e
                log.warning("sandbox start failed (attempt %d/%d): %s", attempt, self.start_attempts, e)
                sb.close()
                continue
            with self._lock:
                if self._closed:
                    sb.close()
                    return
                self._owned[id(sb)] = sb
            self._ready.put(sb)
            return
        raise SandboxError(f"could not start a sandbox after {self.start_attempts} attempts: {last}")

    def _healthy(self, sb: Sandbox) -> bool:
        try:
            res = sb.exec("true", timeout=self.health_timeout_s)
        except Exception as e:  # a crashed sandbox may raise anything from its backend
            log.warning("sandbox health check raised: %s", e)
            return False
        return res.exit_code == 0

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """A started, healthy sandbox; waits up to ``timeout`` s (None: forever) for one to be ready."""
        while True:
            if self._closed:
                raise SandboxError("sandbox pool is closed")
            try:
                sb = self._ready.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no sandbox became ready within {timeout}s (pool size {self.size})") from None
            if sb is _CLOSED:  # closed while waiting (a cancelled run): never block its shutdown
                self._ready.put(sb)
                raise SandboxError("sandbox pool is closed")
            if self._healthy(sb):
                return sb
            log.warning("sandbox %s failed its health check; replacing it", getattr(sb, "name", sb))
            self.replaced += 1
            self.release(sb)

    def release(self, sb: Sandbox) -> None:
        """Close a handed-out sandbox and start its replacement in the background."""
        with self._lock:
            self._owned.pop(id(sb), None)
        sb.close()
        if not self._closed:
            self._workers.submit(self._start_one)

    @contextmanager
    def sandbox(self, timeout: float | None = None) -> Iterator[Sandbox]:
        """``with pool.sandbox() as sb:`` acquire, then release even when the block raises."""
        sb = self.acquire(timeout)
        try:
            yield sb
        finally:
            self.release(sb)

    def close(self) -> None:
        """Close every sandbox, idle or handed out (idempotent)."""
        with self._lock:
            self._closed = True
            owned = list(self._owned.values())
            self._owned.clear()
        self._ready.put(_CLOSED)
        self._workers.shutdown(wait=True, cancel_futures=True)
        for sb in owned:
            sb.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

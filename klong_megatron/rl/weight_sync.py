"""Trainer -> rollout servers weight sync by broadcast (``rl.weight_sync=distributed``), trainer side.

Dataflow: Megatron model -> ``hf_tensors`` ({HF name: tensor} on the trainer's device) ->
``DistributedWeightSync.push(tensors, version)``. On the first push it asks every server its
``tp_size`` (``/get_server_info``; world size = 1 + their sum), then, concurrently:

- a worker thread hosts the rendezvous at ``master_address:master_port`` and joins the group as
  rank 0 (first push only), then broadcasts every tensor in ``names`` order;
- ``engine.update_weights(WeightUpdate(names=...))`` makes each server join the group
  (``/init_weights_update_group``, first push only) and receive + load the tensors
  (``/update_weights_from_distributed``), tagging later generations with ``version``.

The first failure on either side raises ``WeightSyncError`` naming the server(s); nothing waits
longer than ``timeout_s`` (group, broadcasts) or the engine's ``control_timeout_s`` (HTTP). After a
failure the group is in an unknown state: later pushes raise; ``close()`` and build a new one.

Only trainer rank 0 pushes (its copy of the weights is complete at TP = PP = 1); the other ranks
take no part. The group is separate from the trainer's default ``torch.distributed`` world.

Limits: one server process per ``tp_size`` ranks (SGLang ``dp_size`` = 1); the whole HF state dict
is materialised on the trainer's device before sending (no bucketing); NCCL needs the trainer on a
GPU, gloo is for CPU runs and tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.rollout.engine import WeightUpdate
from klong_megatron.rollout.sglang import SGLangEngine
from klong_megatron.rollout.weight_group import (
    BACKENDS,
    broadcast_tensors,
    destroy_weight_group,
    dtype_name,
    init_weight_group,
)

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """A weight push failed (a server down or refusing, a timeout, a broken group)."""


def free_port() -> int:
    """A TCP port free on every interface of this host now (for ``master_port``)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedWeightSync:
    """Pushes weights from trainer rank 0 to every server of ``engine`` by broadcast.

    ``master_address``: an address of this host that every server can reach (on a cluster, the
    trainer rank 0 node's hostname, ``socket.gethostname()``); ``master_port``: a free port there,
    not the trainer's own ``MASTER_PORT``. ``backend``: ``nccl`` (GPU) or ``gloo`` (CPU).
    ``group_name`` defaults to a fresh unique name. ``timeout_s`` bounds joining and each broadcast.
    """

    def __init__(
        self,
        engine: SGLangEngine,
        *,
        master_address: str,
        master_port: int,
        backend: str = "nccl",
        group_name: str | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not master_address:
            raise ValueError("master_address is empty (an address of the trainer host the servers can reach)")
        if not 0 < master_port < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {master_port}")
        self.engine = engine
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group_name = group_name or f"klong_weight_sync_{uuid.uuid4().hex[:8]}"
        self.timeout_s = timeout_s
        self.world_size = 0
        """1 + the servers' tp sizes; 0 until the first push."""
        self._pg: Any = None
        self._worker: threading.Thread | None = None
        self._broken = ""

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.engine.servers]

    async def push(self, tensors: dict[str, torch.Tensor], version: str) -> None:
        """Every server loads ``tensors`` (HF names -> tensors, any dtype) and reports ``version``."""
        if self._broken:
            raise WeightSyncError(f"weight sync group {self.group_name!r} is broken by an earlier failure "
                                  f"({self._broken}); close() it and create a new DistributedWeightSync")  # fmt: skip
        if not tensors:
            raise ValueError("push: no tensors")
        device = torch.device("cpu") if self.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        send = [t.detach().to(device).contiguous() for t in tensors.values()]
        if self._pg is None:
            self.world_size = await self._world_size()
        update = WeightUpdate(
            str(version),
            names=tuple(tensors),
            dtypes=tuple(dtype_name(t.dtype) for t in send),
            shapes=tuple(tuple(t.shape) for t in send),
            group_name=self.group_name,
            master_address=self.master_address,
            master_port=self.master_port,
            world_size=self.world_size,
            backend=self.backend,
        )
        try:
            await self._together(lambda: self._send(send, device), self.engine.update_weights(update))
        except BaseException as e:  # cancelled too: the servers may be half-way through the update
            self._broken = f"{type(e).__name__}: {e}"
            if not isinstance(e, Exception):
                raise
            raise WeightSyncError(f"pushing weights {version!r} ({len(send)} tensors) to {', '.join(self.urls)} "
                                  f"over group {self.group_name!r} failed: {self._broken}") from e  # fmt: skip
        log.info("pushed %d tensors as weight_version %s to %d server(s)", len(send), version, len(self.urls))

    async def push_model(self, model: torch.nn.Module, model_cfg: ModelConfig, version: str) -> None:
        """``push(hf_tensors(model, model_cfg), version)`` for a whole (TP = PP = 1) Megatron GPT."""
        from klong_megatron.megatron.hf import hf_tensors

        await self.push(hf_tensors(model, model_cfg), version)

    async def close(self) -> None:
        """Servers leave the group (``/destroy_weights_update_group``), then the trainer; idempotent."""
        if self._pg is None:
            return
        body = {"group_name": self.group_name}

        async def leave(s: Any) -> None:
            s.groups.discard(self.group_name)  # the engine must join again if this name is reused
            try:
                r = await s.client.post("/destroy_weights_update_group", json=body, timeout=10.0)
                if r.status_code != 200:
                    log.warning("%s/destroy_weights_update_group: %s %s", s.url, r.status_code, r.text[:200])
            except httpx.HTTPError as e:
                log.warning("%s/destroy_weights_update_group: %s: %s", s.url, type(e).__name__, e)

        await asyncio.gather(*(leave(s) for s in self.engine.servers))
        if self._worker is not None and self._worker.is_alive():
            log.warning("weight sync group %r left in place: a broadcast is still blocked", self.group_name)
        else:
            destroy_weight_group(self._pg)
        self._pg = None

    # ------------------------------------------------------------------ internals
    async def _world_size(self) -> int:
        """1 (the trainer) + each server's ``tp_size``; raises WeightSyncError naming unreachable servers."""

        async def tp_size(s: Any) -> int:
            try:
                r = await s.client.get("/get_server_info", timeout=self.engine.control_timeout_s)
                r.raise_for_status()
                return int(r.json().get("tp_size", 1))
            except (httpx.HTTPError, ValueError) as e:
                raise WeightSyncError(f"{s.url}/get_server_info: {type(e).__name__}: {e} (is the server up?)") from e

        sizes = await asyncio.gather(*(tp_size(s) for s in self.engine.servers), return_exceptions=True)
        errors = [str(e) for e in sizes if isinstance(e, BaseException)]
        if errors:
            raise WeightSyncError("weight sync cannot start: " + "; ".join(errors))
        return 1 + sum(int(n) for n in sizes)  # type: ignore[arg-type]

    def _send(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        """Worker thread: join the group (first push), broadcast every tensor, wait for the device."""
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        if self._pg is None:
            self._pg = init_weight_group(
                backend=self.backend,
                master_address=self.master_address,
                master_port=self.master_port,
                rank=0,
                world_size=self.world_size,
                group_name=self.group_name,
                timeout_s=self.timeout_s,
            )
        broadcast_tensors(self._pg, tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    async def _together(self, blocking: Callable[[], None], http: Any) -> None:
        """Run ``blocking`` in a daemon thread while awaiting ``http``; the first error wins.

        A daemon thread, not the default executor: a broadcast blocked on a dead server must not
        keep the process alive at exit (it ends at ``timeout_s`` anyway).
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def run() -> None:
            exc: BaseException | None = None
            try:
                blocking()
            except BaseException as e:
                exc = e
            try:
                loop.call_soon_threadsafe(settle, exc)
            except RuntimeError:  # the loop is closed: the push already failed and nobody waits
                log.warning("weight sync worker ended after its push failed: %s", exc)

        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        self._worker = threading.Thread(target=run, name="klong-weight-sync", daemon=True)
        self._worker.start()
        task = asyncio.ensure_future(http)
        try:
            await asyncio.wait({done, task}, return_when=asyncio.FIRST_EXCEPTION)
            for f in (task, done):  # the HTTP side names the failing server: report it first
                if f.done() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            await task
            await done
        finally:
            task.cancel()

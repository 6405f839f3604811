"""Trainer -> rollout servers weight sync by broadcast (``rl.weight_sync=distributed``), trainer side.

Dataflow of one ``push(stream, version)`` on trainer rank 0 (SGLang 0.5.23's protocol, see
``rollout/sglang.py``): first push only: every server's ``/server_info`` (world size = 1 + their
``tp_size``; ``pp_size`` / ``dp_size`` > 1 refused by name) -> then ``weights_checker`` checksums before
-> ``pause_generation`` -> ``begin_weight_update`` -> the ``(HF name, tensor)`` stream is cut into
buckets of at most ``bucket_bytes`` (a tensor larger than that is a bucket of its own); per bucket,
concurrently: a worker thread broadcasts its tensors from rank 0 of the weight group (joining the group
on the first bucket of the first push) and every server receives and loads them
(``/update_weights_from_distributed``, names / dtypes / shapes of that bucket) -> ``end_weight_update``
-> ``flush_cache`` rides on the last bucket -> ``continue_generation`` -> verification: every server
reports ``weight_version == version`` and its ``/weights_checker`` checksums show the push landed:
``verify="checksum"``: each pushed tensor's checksum equals the server's under the same name (servers
that keep HF names: ``klong-devserver``); ``verify="changed"`` (SGLang, whose parameters are fused and
sharded under other names): when the trainer's weights changed since its last push (a per-tensor sum
fingerprint), the engine checksum must have changed too: this catches a push that loaded nothing,
not one that loaded part; ``verify="off"``. ``known_names`` (the
HF names of the checkpoint the servers were started from) refuses an unknown name before anything is
sent: SGLang's loaders skip unknown names silently.

Memory: rank 0 holds one bucket plus the tensor group being produced; the stream is produced lazily
(``megatron/hf.hf_tensor_stream``: with TP/PP/EP > 1 every trainer rank takes part, each contributes
its shards, only rank 0 receives). A server receives one bucket at a time.

Failures: the first failure on either side raises ``WeightSyncError`` naming the server(s); nothing
waits longer than ``timeout_s`` (group, broadcasts) or the engine's weight / control timeouts. After a
failure mid-push the servers are left paused (no rollout runs on a mix of versions), the group is
broken (later pushes raise): the run stops and resumes from its last checkpoint, which pushes again.

Limits: one server process per ``tp_size`` ranks; NCCL needs the trainer on a GPU, gloo is for CPU
runs and tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.rollout.engine import EngineError, WeightUpdate
from klong_megatron.rollout.sglang import SGLangEngine
from klong_megatron.rollout.weight_group import (
    BACKENDS,
    broadcast_tensors,
    destroy_weight_group,
    dtype_name,
    init_weight_group,
    tensor_checksum,
)

log = logging.getLogger(__name__)

VERIFY = ("checksum", "changed", "off")
Bucket = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight push failed (a server down or refusing, a timeout, a broken group, weights not loaded)."""


def free_port() -> int:
    """A TCP port free on every interface of this host now (for ``master_port``)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def buckets(stream: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Cut ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` (or one larger tensor), in order."""
    bucket: Bucket = []
    size = 0
    for name, t in stream:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def contribute_shards(model: torch.nn.Module, model_cfg: ModelConfig) -> None:
    """Trainer ranks other than 0: take part in rank 0's ``push_model`` (send this rank's shards)."""
    from klong_megatron.megatron.hf_sharded import hf_tensor_stream

    for _ in hf_tensor_stream(model, model_cfg):
        pass


class DistributedWeightSync:
    """Pushes weights from trainer rank 0 to every server of ``engine`` by broadcast, in buckets.

    ``master_address``: an address of this host that every server can reach (on a cluster, the
    trainer rank 0 node's hostname); ``master_port``: a free port there, not the trainer's own
    ``MASTER_PORT``. ``backend``: ``nccl`` (GPU) or ``gloo`` (CPU). ``group_name`` defaults to a fresh
    unique name. ``timeout_s`` bounds joining and each broadcast. ``bucket_bytes``: see the module doc.
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
        bucket_bytes: int = 512 << 20,
        verify: str = "changed",
        known_names: set[str] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not master_address:
            raise ValueError("master_address is empty (an address of the trainer host the servers can reach)")
        if not 0 < master_port < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {master_port}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        self.engine = engine
        self.master_address = master_address
        self.master_port = master_port
        self.backend = backend
        self.group_name = group_name or f"klong_weight_sync_{uuid.uuid4().hex[:8]}"
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self.verify = verify
        self.known_names = known_names
        self.world_size = 0
        """1 + the servers' tp sizes; 0 until the first push."""
        self.last_push: dict[str, float] = {}
        """Counters of the last push: tensors, bytes, buckets, largest bucket bytes."""
        self._tp_sizes: list[int] = []
        self._fingerprint: dict[str, str] | None = None  # verify="changed": what the last push sent
        self._pg: Any = None
        self._worker: threading.Thread | None = None
        self._broken = ""

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.engine.servers]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())

    async def push(self, tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Every server loads the ``(HF name, tensor)`` pairs (any dtype) and reports ``version``."""
        if self._broken:
            raise WeightSyncError(f"weight sync group {self.group_name!r} is broken by an earlier failure "
                                  f"({self._broken}); close() it and create a new DistributedWeightSync")  # fmt: skip
        stream = iter(tensors.items()) if isinstance(tensors, dict) else iter(tensors)
        try:
            if self._pg is None:
                self._tp_sizes = await self._layout()
                self.world_size = 1 + sum(self._tp_sizes)
            before = await self._checksums() if self.verify != "off" else []
        except BaseException:
            for _ in stream:  # a sharded stream: the other trainer ranks are in its collectives, let them finish
                pass
            raise
        sent: dict[str, str] = {}
        stats = {"tensors": 0.0, "bytes": 0.0, "buckets": 0.0, "max_bucket_bytes": 0.0}
        stage = "pause_generation"
        try:
            await self.engine.pause()
            stage = "begin_weight_update"
            await self.engine.begin_weight_update()
            stage = "update_weights_from_distributed"
            chunks = buckets(stream, self.bucket_bytes)
            pending = next(chunks, None)
            while pending is not None:
                nxt = next(chunks, None)
                await self._push_bucket(pending, version, last=nxt is None, sent=sent, stats=stats)
                pending = nxt
            if not stats["tensors"]:
                raise ValueError("push: no tensors")
            stage = "end_weight_update"
            await self.engine.end_weight_update()
        except BaseException as e:  # cancelled too: the servers may be half-way through the update
            self._broken = f"{type(e).__name__}: {e}"
            for _ in stream:  # the other trainer ranks are still producing it (collectives): let them finish
                pass
            if not isinstance(e, Exception):
                raise
            raise WeightSyncError(f"pushing weights {version!r} to {', '.join(self.urls)} over group "
                                  f"{self.group_name!r} failed at {stage}: {self._broken} (the servers stay "
                                  "paused: resume the run from its last checkpoint)") from e  # fmt: skip
        await self.engine.resume()
        self.last_push = stats
        await self._verify(version, before, sent)
        log.info("pushed %d tensors (%.1f MB, %d buckets) as weight_version %s to %d server(s)", stats["tensors"],
                 stats["bytes"] / 1e6, stats["buckets"], version, len(self.urls))  # fmt: skip

    async def push_model(self, model: torch.nn.Module, model_cfg: ModelConfig, version: str) -> None:
        """Push a Megatron GPT from trainer rank 0; with TP/PP/EP > 1 every other rank must call
        :func:`contribute_shards` at the same time."""
        from klong_megatron.megatron.hf_sharded import hf_tensor_stream

        await self.push(hf_tensor_stream(model, model_cfg), version)

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
    async def _push_bucket(self, bucket: Bucket, version: str, *, last: bool, sent: dict, stats: dict) -> None:
        device = self.device
        names = [n for n, _ in bucket]
        if self.known_names is not None:
            unknown = [n for n in names if n not in self.known_names]
            if unknown:
                raise ValueError(f"{len(unknown)} name(s) the servers' checkpoint does not have, e.g. {unknown[0]!r}: "
                                 "SGLang would skip them silently")  # fmt: skip
        send = [t.detach().to(device).contiguous() for _, t in bucket]
        if self.verify == "checksum":
            sent.update({n: tensor_checksum(t) for n, t in zip(names, send, strict=True)})
        elif self.verify == "changed":  # a cheap fingerprint (one reduction per tensor, on the device)
            sent.update({n: repr(float(t.double().sum())) for n, t in zip(names, send, strict=True)})
        update = WeightUpdate(
            str(version),
            names=tuple(names),
            dtypes=tuple(dtype_name(t.dtype) for t in send),
            shapes=tuple(tuple(t.shape) for t in send),
            group_name=self.group_name,
            master_address=self.master_address,
            master_port=self.master_port,
            world_size=self.world_size,
            backend=self.backend,
        )
        if self._pg is None:
            await self._together(lambda: self._join(device), self.engine.join_group(update, self._tp_sizes))
        await self._together(lambda: self._send(send, device),
                             self.engine.update_weights_from_distributed(update, last=last))  # fmt: skip
        nbytes = sum(t.numel() * t.element_size() for t in send)
        stats["tensors"] += len(send)
        stats["bytes"] += nbytes
        stats["buckets"] += 1
        stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], nbytes)

    async def _layout(self) -> list[int]:
        """Each server's ``tp_size``; WeightSyncError naming unreachable servers or unsupported layouts."""
        try:
            infos = await self.engine.server_infos()
        except (EngineError, httpx.HTTPError, ValueError) as e:
            raise WeightSyncError(f"weight sync cannot start: {e} (is the server up?)") from e
        bad = [f"{url} (pp_size={i.get('pp_size', 1)}, dp_size={i.get('dp_size', 1)})"
               for url, i in zip(self.urls, infos, strict=True)
               if int(i.get("pp_size", 1)) > 1 or int(i.get("dp_size", 1)) > 1]  # fmt: skip
        if bad:
            raise WeightSyncError("broadcast weight sync needs SGLang servers with pp_size = dp_size = 1 (SGLang joins "
                                  "as rank_offset + tp_rank and asserts dp_size == 1); run one server per replica "
                                  "or use rl.weight_sync=disk: " + ", ".join(bad))  # fmt: skip
        return [int(i.get("tp_size", 1)) for i in infos]

    async def _checksums(self) -> list[dict[str, Any]]:
        try:
            return await self.engine.weight_checksums()
        except EngineError as e:
            raise WeightSyncError(f"weight verification needs /weights_checker: {e} (or set verify='off')") from e

    async def _verify(self, version: str, before: list[dict[str, Any]], sent: dict[str, str]) -> None:
        """Raise WeightSyncError naming each server that did not load the push (see the module doc)."""
        try:
            await self.engine.check_version(version)
        except EngineError as e:
            raise WeightSyncError(str(e)) from e
        if self.verify == "off":
            return
        after = await self._checksums()
        problems = []
        pushed_new = self.verify == "changed" and self._fingerprint not in (None, sent)
        if self.verify == "changed":
            self._fingerprint = dict(sent)
        for url, old, new in zip(self.urls, before, after, strict=True):
            if self.verify == "changed":
                if pushed_new and old.get("per_engine_checksum") == new.get("per_engine_checksum"):
                    problems.append(f"{url}: no weight changed (unknown names are skipped by SGLang's loaders)")
                continue
            served = {n: c for r in new.get("ranks", []) for n, c in r["checksums"].items()}
            missing = [n for n in sent if n not in served]
            differ = [n for n in sent if n in served and served[n] != sent[n]]
            if missing or differ:
                problems.append(f"{url}: {len(missing)} pushed name(s) unknown to the server (e.g. "
                                f"{(missing or ['-'])[0]}), {len(differ)} tensor(s) differ (e.g. "
                                f"{(differ or ['-'])[0]})")  # fmt: skip
        if problems:
            raise WeightSyncError(f"weight push {version!r} did not load as sent: " + "; ".join(problems))

    def _join(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        self._pg = init_weight_group(
            backend=self.backend,
            master_address=self.master_address,
            master_port=self.master_port,
            rank=0,
            world_size=self.world_size,
            group_name=self.group_name,
            timeout_s=self.timeout_s,
        )

    def _send(self, tensors: list[torch.Tensor], device: torch.device) -> None:
        """Worker thread: broadcast every tensor of one bucket, wait for the device."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
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

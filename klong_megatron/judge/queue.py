"""Persistent async priority queue of grading jobs: eval before train, bounded concurrency, resume on restart.

Dataflow: ``submit(job)`` -> job file written to ``state_dir/pending/`` (big texts such as the rubric
and paper go to content-addressed ``state_dir/blobs/``, stored once) -> priority queue (eval first,
then FIFO) -> one of ``max_concurrent_jobs`` workers runs ``runner(job)`` -> result written to
``state_dir/done/<id>.json``, pending file removed, ``wait(id)`` resolves.

Never lost: a job leaves ``pending/`` only after its result is on disk; a queue started on the same
``state_dir`` re-enqueues every pending job (``resumed`` in the metrics). A runner that raises is
reported and retried up to ``max_job_attempts`` times, then the job is recorded as failed (``wait``
raises :class:`JobFailed`). With ``state_dir=None`` the queue lives in memory only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import statistics
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.judge.base import PRIORITIES

log = logging.getLogger(__name__)
_BLOB_FIELDS = ("rubric", "paper", "addendum", "judge_addendum")


class JobFailed(RuntimeError):
    """A job whose runner raised on every attempt."""


@dataclass
class Job:
    """One grading request. ``rubric`` is rubric JSON text; ``paper``/``addendum``/``judge_addendum`` are Markdown."""

    priority: str
    submission_dir: str
    rubric: str
    paper: str = ""
    addendum: str = ""
    judge_addendum: str = ""
    out_path: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"job priority must be one of {PRIORITIES}, got {self.priority!r}")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class JudgeQueue:
    """Runs ``runner(job) -> result dict`` for submitted jobs; see the module docstring for guarantees."""

    def __init__(
        self,
        runner: Callable[[Job], Awaitable[dict[str, Any]]],
        *,
        state_dir: str | Path | None = None,
        max_concurrent_jobs: int = 4,
        max_job_attempts: int = 3,
    ) -> None:
        if max_concurrent_jobs < 1 or max_job_attempts < 1:
            raise ValueError("max_concurrent_jobs and max_job_attempts must be >= 1")
        self.runner = runner
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.max_concurrent_jobs = max_concurrent_jobs
        self.max_job_attempts = max_job_attempts
        self._pq: asyncio.PriorityQueue[tuple[int, float, int, Job]] | None = None
        self._seq = 0
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._running = 0
        self._counts = {"completed": 0, "failed": 0, "retried": 0, "resumed": 0}
        self._latency: dict[str, deque[float]] = {p: deque(maxlen=2000) for p in PRIORITIES}
        self._wait: dict[str, deque[float]] = {p: deque(maxlen=2000) for p in PRIORITIES}
        if self.state_dir is not None:
            for sub in ("pending", "done", "blobs"):
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> list[str]:
        """Start the workers and re-enqueue jobs left pending on disk; returns the resumed job ids."""
        self._pq = asyncio.PriorityQueue()
        resumed = []
        if self.state_dir is not None:
            jobs = []
            for path in (self.state_dir / "pending").glob("*.json"):
                if (self.state_dir / "done" / path.name).exists():  # killed between writing done and unlinking
                    path.unlink()
                else:
                    jobs.append(self._load(path))
            for job in sorted(jobs, key=lambda j: j.created):
                self._enqueue(job)
                resumed.append(job.id)
            self._counts["resumed"] += len(resumed)
            if resumed:
                log.info("judge queue: resumed %d pending jobs from %s", len(resumed), self.state_dir)
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.max_concurrent_jobs)]
        return resumed

    async def close(self) -> None:
        """Stop the workers; unfinished jobs stay pending on disk for the next start."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    # ------------------------------------------------------------ API

    def submit(self, job: Job) -> str:
        """Persist and enqueue ``job``; returns its id (``await wait(id)`` for the result)."""
        assert self._pq is not None, "start() the queue first"
        if self.state_dir is not None:
            self._persist(job)
        self._enqueue(job)
        return job.id

    async def wait(self, job_id: str) -> dict[str, Any]:
        """The job's result; raises JobFailed if it failed on every attempt."""
        if self.state_dir is not None and (done := self.state_dir / "done" / f"{job_id}.json").exists():
            record = json.loads(done.read_text())
            if "error" in record:
                raise JobFailed(f"judge job {job_id}: {record['error']}")
            return record["result"]
        return await asyncio.shield(self._future(job_id))

    def metrics(self) -> dict[str, float]:
        """Queue depth per priority, running jobs, counters, and latency percentiles (seconds)."""
        assert self._pq is not None
        depth = {p: 0 for p in PRIORITIES}
        for _, _, _, job in list(self._pq._queue):  # type: ignore[attr-defined]
            depth[job.priority] += 1
        out: dict[str, float] = {f"judge_queue/depth_{p}": n for p, n in depth.items()}
        out["judge_queue/running"] = self._running
        out.update({f"judge_queue/{k}": v for k, v in self._counts.items()})
        for p in PRIORITIES:
            for name, values in (("latency", self._latency[p]), ("wait", self._wait[p])):
                if values:
                    q = statistics.quantiles(values, n=20) if len(values) > 1 else [values[0]] * 19
                    out[f"judge_queue/{name}_{p}_p50"] = statistics.median(values)
                    out[f"judge_queue/{name}_{p}_p95"] = q[18]
        return out

    # ------------------------------------------------------------ internals

    def _future(self, job_id: str) -> asyncio.Future[dict[str, Any]]:
        if job_id not in self._futures:
            self._futures[job_id] = asyncio.get_running_loop().create_future()
        return self._futures[job_id]

    def _enqueue(self, job: Job) -> None:
        assert self._pq is not None
        self._future(job.id)
        self._seq += 1
        self._pq.put_nowait((PRIORITIES.index(job.priority), job.created, self._seq, job))

    async def _worker(self) -> None:
        assert self._pq is not None
        while True:
            _, _, _, job = await self._pq.get()
            self._running += 1
            self._wait[job.priority].append(time.time() - job.created)
            try:
                result = await self.runner(job)
            except Exception as e:  # reported, retried, then recorded as failed: never dropped
                job.attempts += 1
                why = f"{type(e).__name__}: {e}"
                if job.attempts < self.max_job_attempts:
                    log.warning("judge job %s failed (attempt %d): %s; retrying", job.id, job.attempts, why)
                    self._counts["retried"] += 1
                    if self.state_dir is not None:
                        self._persist(job)
                    self._enqueue(job)
                else:
                    log.error("judge job %s failed after %d attempts: %s", job.id, job.attempts, why)
                    self._finish(job, {"error": why})
            else:
                self._finish(job, {"result": result})
            finally:
                self._running -= 1

    def _finish(self, job: Job, record: dict[str, Any]) -> None:
        if self.state_dir is not None:
            _atomic_write(self.state_dir / "done" / f"{job.id}.json", json.dumps({"id": job.id, **record}))
            (self.state_dir / "pending" / f"{job.id}.json").unlink(missing_ok=True)
        self._latency[job.priority].append(time.time() - job.created)
        fut = self._future(job.id)
        if "error" in record:
            self._counts["failed"] += 1
            fut.set_exception(JobFailed(f"judge job {job.id}: {record['error']}"))
            fut.exception()  # mark retrieved: nobody may be waiting on a resumed job
        else:
            self._counts["completed"] += 1
            fut.set_result(record["result"])

    def _persist(self, job: Job) -> None:
        assert self.state_dir is not None
        record = {k: v for k, v in vars(job).items() if k not in _BLOB_FIELDS}
        for name in _BLOB_FIELDS:
            text = getattr(job, name)
            key = hashlib.sha256(text.encode()).hexdigest()
            blob = self.state_dir / "blobs" / key
            if not blob.exists():
                _atomic_write(blob, text)
            record[name] = key
        _atomic_write(self.state_dir / "pending" / f"{job.id}.json", json.dumps(record))

    def _load(self, path: Path) -> Job:
        assert self.state_dir is not None
        record = json.loads(path.read_text())
        for name in _BLOB_FIELDS:
            if name in record:  # a job written before the field existed lacks it
                record[name] = (self.state_dir / "blobs" / record[name]).read_text()
        return Job(**record)

"""``klong-data prepare``: render + split + pack plan once, in worker processes, into a memory-mapped store.

Dataflow: input JSONL files (one shard each) -> worker processes: ``read_trajectories`` -> ``Renderer.render``
-> ``split_trajectory`` (the run's ``ContextPolicy``, the same public path as the in-memory dataset) ->
``StoreWriter`` (shard store + ``.done.json``) -> main process: merge the shards in input order
(megatron-core's ``IndexedDatasetBuilder.add_index``) -> best-fit-decreasing pack plan per split
(``pack.<split>.{windows,offsets}.npy``) -> ``manifest.json`` (written last).

Resume: a shard whose ``.done.json`` names the same source sha256, the same settings and intact files is not
redone; an interrupted or failed prepare rerun with the same arguments redoes only the missing shards.
Held-out split, window order and pack plan equal ``build_sft_datasets``' (trajectory hash, file order).

Limits: parallelism is over input files (one file = one shard = one worker at a time): write a big corpus as
many files. The merged store is a copy of the shards (they are deleted after the manifest is written), so
preparing needs twice the store's size on disk for a moment.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from klong_megatron.config.data import DataConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.dataset import is_held_out
from klong_megatron.data.pack import pack_lengths, packing_efficiency
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.split import SplitStats, split_trajectory
from klong_megatron.data.trajectory import ReadStats, read_trajectories
from klong_megatron.prepared.manifest import MANIFEST, Manifest, source_record
from klong_megatron.prepared.store import StoreWriter, store_files

STORE = "windows"
"""Prefix of the merged store inside a prepared directory."""
SPLITS = ("train", "valid")


@dataclass
class ShardTask:
    index: int
    source: dict[str, Any]
    prefix: str
    key: str
    """source sha256 + settings key: a finished shard with another key is redone"""
    valid_by_file: bool


_progress_queue: Any = None


def _init_worker(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _done_path(prefix: str) -> Path:
    return Path(prefix + ".done.json")


def shard_is_done(task: ShardTask) -> bool:
    """The shard's marker has the task's key and every file it lists has its recorded size."""
    marker = _done_path(task.prefix)
    if not marker.exists():
        return False
    done = json.loads(marker.read_text())
    files = done.get("files", {})
    intact = all(p.exists() and p.stat().st_size == files.get(p.name) for p in store_files(task.prefix))
    return done.get("key") == task.key and intact


def run_shard(task: ShardTask, cfg: DataConfig) -> dict[str, Any]:
    """Render and split one input file into the shard store ``task.prefix`` (worker process)."""
    renderer = Renderer(load_tokenizer(cfg.tokenizer))
    policy = ContextPolicy.from_renderer(cfg.policy, renderer)
    _done_path(task.prefix).unlink(missing_ok=True)
    writer, stats, read = StoreWriter(task.prefix), SplitStats(), ReadStats()
    split = task.source["split"]
    for traj in read_trajectories(task.source["path"], skip_invalid=cfg.skip_invalid, stats=read):
        windows = split_trajectory(renderer.render(traj), policy)
        held = split == "valid" or (not task.valid_by_file and is_held_out(traj.id, cfg.valid_fraction, cfg.seed))
        writer.add_trajectory(traj.id, windows, held)
        stats.trajectories += 1
        stats.windows += len(windows)
        stats.window_tokens += sum(len(w) for w in windows)
        stats.trained_tokens += sum(int(w.loss_mask.sum()) for w in windows)
        if _progress_queue is not None:
            _progress_queue.put((1, sum(len(w) for w in windows)))
    writer.finalize()
    counts = {
        k: v for k, v in asdict(stats).items() if k in ("trajectories", "windows", "window_tokens", "trained_tokens")
    }
    counts["skipped"] = read.skipped
    done = {
        "key": task.key,
        "counts": counts,
        "first_error": read.errors[0] if read.errors else None,
        "files": {p.name: p.stat().st_size for p in store_files(task.prefix)},
    }
    _done_path(task.prefix).write_text(json.dumps(done))
    return done


def _shard_worker(args: tuple[ShardTask, DataConfig]) -> dict[str, Any]:
    return run_shard(*args)


def _count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            n += chunk.count(b"\n")
    return n


def _run_shards(tasks: list[ShardTask], cfg: DataConfig, workers: int, progress: bool) -> None:
    """Run ``tasks`` over ``workers`` processes with one progress bar (trajectories, window tokens)."""
    if not tasks:
        return
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    total = sum(_count_lines(t.source["path"]) for t in tasks)
    counter = TextColumn("{task.completed:,.0f}/{task.total:,.0f} trajectories, {task.fields[tokens]:,} window tokens")
    columns = (TextColumn("prepare"), BarColumn(), counter, TimeElapsedColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, disable=not progress, transient=True) as bar,
        ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(queue,)) as pool,
    ):
        job = bar.add_task("prepare", total=total, tokens=0)
        result = pool.map_async(_shard_worker, [(t, cfg) for t in tasks], chunksize=1)
        tokens = 0
        while not result.ready() or not queue.empty():
            try:
                n, t = queue.get(timeout=0.2)
            except Exception:  # queue.Empty: nothing reported in this interval
                continue
            tokens += t
            bar.update(job, advance=n, tokens=tokens)
        result.get()  # re-raises a worker's error (e.g. TrajectoryError file:line), finished shards stay done


def _write_pack_plan(directory: Path, split: str, window_ids: np.ndarray, lengths: np.ndarray, seq_len: int) -> dict:
    bins = pack_lengths(lengths[window_ids].tolist(), seq_len)
    flat = np.asarray([window_ids[i] for b in bins for i in b], np.int64)
    offsets = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
    np.save(directory / f"pack.{split}.windows.npy", flat)
    np.save(directory / f"pack.{split}.offsets.npy", offsets)
    eff = packing_efficiency(lengths[window_ids].tolist(), bins, seq_len)
    return {"sequences": len(bins), "efficiency": eff, "windows": len(window_ids)}


def prepare(
    train_files: list[str],
    cfg: DataConfig,
    out: str | Path,
    *,
    valid_files: list[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[Manifest, dict[str, int]]:
    """Prepare ``train_files`` (+ held-out ``valid_files``) with ``cfg`` into directory ``out``.

    Returns the manifest and ``{"shards": n, "done_before": k, "ran": n - k}``. Raises the first worker
    error (finished shards stay done for the next run).
    """
    from klong_megatron.prepared.store import WindowStore

    start = time.perf_counter()
    out = Path(out)
    valid_files = valid_files or []
    for f in [*train_files, *valid_files]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"input trajectory file {f!r} does not exist")
    sources = [source_record(f, "train") for f in train_files] + [source_record(f, "valid") for f in valid_files]
    manifest = Manifest.for_config(cfg, sources)
    if (out / MANIFEST).exists() and _up_to_date(out, manifest):
        return Manifest.read(out), {"shards": len(sources), "done_before": len(sources), "ran": 0}
    (out / MANIFEST).unlink(missing_ok=True)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    settings, by_file = manifest.settings_key(), bool(valid_files)
    tasks = [
        ShardTask(i, s, str(shard_dir / f"{i:05d}"), f"{s['sha256']}:{settings}", by_file)
        for i, s in enumerate(sources)
    ]
    todo = [t for t in tasks if not shard_is_done(t)]
    _run_shards(todo, cfg, workers, progress)

    writer = StoreWriter(out / STORE)
    counts: dict[str, int] = {}
    for t in tasks:
        writer.add_store(t.prefix)
        for k, v in json.loads(_done_path(t.prefix).read_text())["counts"].items():
            counts[k] = counts.get(k, 0) + v
    writer.finalize()
    store = WindowStore(out / STORE)
    held = np.asarray(store.rows[:, 4])
    lengths = np.asarray(store.lengths)
    if not (held == 0).any():
        raise ValueError(f"no training windows from {train_files}")
    for split, ids in zip(SPLITS, (np.flatnonzero(held == 0), np.flatnonzero(held == 1)), strict=True):
        manifest.pack[split] = _write_pack_plan(out, split, ids, lengths, manifest.seq_len)
    del store
    seconds = time.perf_counter() - start
    manifest.counts = counts
    manifest.files = {p.name: p.stat().st_size for p in store_files(out / STORE)}
    manifest.prepare = {
        "workers": workers,
        "seconds": seconds,
        "window_tokens_per_s": counts["window_tokens"] / seconds,
    }
    manifest.write(out)
    shutil.rmtree(shard_dir)
    return manifest, {"shards": len(tasks), "done_before": len(tasks) - len(todo), "ran": len(todo)}


def _up_to_date(out: Path, manifest: Manifest) -> bool:
    try:
        old = Manifest.read(out)
    except ValueError:
        return False
    same = old.settings_key() == manifest.settings_key() and old.seq_len == manifest.seq_len
    return same and [s["sha256"] for s in old.sources] == [s["sha256"] for s in manifest.sources]

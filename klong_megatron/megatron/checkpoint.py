"""Checkpoints with Megatron ``dist_checkpointing``: model, optimizer, LR scheduler, RNG, data position.

Layout of ``save_dir``::

    save_dir/iter_0000020/          one dist_checkpointing directory per saved step (complete ones only)
    save_dir/iter_0000030.partial/  a save in progress, or one that was killed (never loaded)
    save_dir/latest                 text file: the step of the newest complete checkpoint

A checkpoint is resharded on load (saved at TP=2, loaded at TP=1 works). RNG states are one
``ShardedObject`` per (pipeline, tensor) rank, replicated over data- and context-parallel ranks (they share
the seed). The distributed optimizer state is saved ``fully_reshardable`` (resumable at another TP/PP/DP
layout); a checkpoint's own format (its content metadata) is used on load. A save writes ``iter_N.partial``;
after every rank finished, rank 0 renames it to ``iter_N`` and then writes ``latest``, so a run killed
mid-save resumes from the previous checkpoint and an ``iter_N`` directory is always complete.

SIGTERM / SIGINT arriving during a save are deferred (:func:`deferred_signals`): the save finishes, then
the signal goes to the handler that was installed before (the trainer's stop flag, or the default).

Fully parallel saves (``fully_parallel=True``): every tensor replicated over DP x CP is written by one of its
replicas, chosen to balance bytes per rank (megatron-core ``FullyParallelSaveStrategyWrapper``), instead of all by
DP rank 0. Asynchronous saves (an :class:`AsyncSaver`): the state is staged to host memory and written by a forked
process (megatron-core ``AsyncCallsQueue``) while training goes on; the rename to ``iter_N`` and ``latest`` happen
in the finalisation after every rank's writer finished (``AsyncSaver.poll`` each step, ``wait`` before the next
save and at the end), so a run killed while a background save is written resumes from the previous checkpoint.

For inference (dev server, RL reference model) :func:`load_model_weights` loads only the model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from klong_megatron.megatron.training import gather_params

# fully_reshardable: the distributed optimizer's state in model-parameter shape (gathered over DP on save,
# sliced per rank on load), so a checkpoint resumes at any TP/PP/DP layout (megatron-core 0.16.1
# ``DistributedOptimizer.sharded_state_dict``); dp_reshardable (older checkpoints) only across DP.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Progress restored on resume besides model/optimizer tensors."""

    step: int = 0
    """Optimizer steps done."""
    consumed_samples: int = 0
    """Global sample position in the data order (SampleOrder index)."""


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"iter_{step:07d}"


def latest_step(save_dir: str | Path) -> int | None:
    """Step of the newest complete checkpoint in ``save_dir``, or None when there is none."""
    marker = Path(save_dir) / "latest"
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected a step number, found {text!r}")
    return int(text)


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(state: dict[str, Any] | None) -> ShardedObject:
    """One RNG object per (PP, TP) rank, replicated over DP x CP ranks (Megatron's ``get_rng_state``:
    ``replica_id = data-parallel rank with context parallelism``; without CP, CP > 1 saves duplicate keys)."""
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_n, tp_n = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", state, (pp_n, tp_n), (pp, tp), replica_id=replica)


def _layout() -> dict[str, int]:
    """The model-parallel layout a checkpoint is saved at (kept in its content metadata)."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _state_dict(
    model,
    optimizer,
    scheduler,
    train_state: TrainState | None,
    *,
    loading: bool,
    metadata: dict | None = None,
    rng: bool = True,
) -> dict:
    model_sd = _unwrap(model).sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        metadata = metadata or _OPTIM_METADATA
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if train_state is not None:
        sd["train_state"] = vars(train_state).copy()
        if rng:
            sd["rng_state"] = _sharded_rng(None if loading else _rng_state())
    return sd


@contextlib.contextmanager
def deferred_signals(signals: tuple[int, ...] = DEFERRED_SIGNALS) -> Iterator[list[int]]:
    """Hold ``signals`` (SIGTERM, SIGINT) while the block runs; afterwards deliver each one received once
    to the handler that was installed before (so the default action, KeyboardInterrupt or a stop flag
    happens after the block). Yields the list of signal numbers received so far.

    Processes forked inside the block (dist_checkpointing's writer processes) start with these signals
    blocked, so a signal sent to the whole process group (Slurm preemption, ``kill -- -PGID``) cannot kill
    them mid-write; ``spawn`` children get neither mask nor handlers (see
    :func:`_start_results_queue_ignoring_sigterm`). Outside the main thread, where Python cannot install
    handlers, the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield received
    finally:
        # Signals that hit this thread while blocked are pending: take them here instead of on unblock.
        while (pending := signal.sigpending() & set(signals)) and (info := signal.sigtimedwait(pending, 0)):
            received.append(info.si_signo)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


def _start_results_queue_ignoring_sigterm() -> None:
    """Start dist_checkpointing's write-results queue in a manager process that ignores SIGTERM.

    ``filesystem_async`` serves that queue from a ``spawn`` manager process it starts on the first save
    (spawned processes do not inherit Python handlers or the signal mask). Started there, a SIGTERM sent
    to the whole process group kills it and the save in progress fails (BrokenPipeError /
    ConnectionRefusedError). Started here, it ignores SIGTERM (the manager ignores SIGINT itself) and
    exits when this process exits, however it ends (a killed parent cannot stop it, so it watches its
    parent). A no-op once started, or on a Megatron without that queue.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_results_manager_init, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def _results_manager_init(parent: int) -> None:
    """In the results-queue manager: ignore SIGTERM; exit as soon as ``parent`` is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _publish(partial: Path, final: Path) -> None:
    """Rename a finished ``iter_N.partial`` to ``iter_N`` (replacing an older ``iter_N`` if there is one)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class AsyncSaver:
    """Checkpoint writes in the background: at most one in flight (megatron-core ``AsyncCallsQueue``, a forked
    writer process per save). Collective: every rank calls :meth:`poll` at the same points (once per step) and
    :meth:`wait` before exiting; both return the checkpoint directories that became complete."""

    def __init__(self) -> None:
        self.queue = AsyncCallsQueue()
        self.pending: list[Path] = []

    def poll(self) -> list[Path]:
        """Finalise the save if every rank's writer finished (non-blocking; one all-reduce)."""
        return self._finalize(blocking=False)

    def wait(self) -> list[Path]:
        """Block until the save in flight is written and published (SIGTERM / SIGINT deferred meanwhile)."""
        with deferred_signals():
            return self._finalize(blocking=True)

    def _finalize(self, *, blocking: bool) -> list[Path]:
        if not self.pending:
            return []
        done = len(self.queue.maybe_finalize_async_calls(blocking=blocking))
        published, self.pending = self.pending[:done], self.pending[done:]
        return published


def _save_strategy(fully_parallel: bool):
    """torch_dist, optionally spread over the DP x CP replicas of every tensor (Megatron-LM's default on GPUs)."""
    strategy = get_default_save_sharded_strategy()
    if not fully_parallel:
        return strategy
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(strategy, group, do_cache_distribution=False)


def _publish_step(partial: Path, path: Path, save_dir: Path, step: int) -> None:
    """Collective: after every rank wrote its part, rank 0 renames ``partial`` to ``path`` and writes ``latest``."""
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(partial, path)
        tmp = save_dir / "latest.tmp"
        tmp.write_text(str(step))
        tmp.replace(save_dir / "latest")
    dist.barrier()


def save_checkpoint(
    save_dir: str | Path,
    model,
    optimizer,
    scheduler,
    train_state: TrainState,
    *,
    fully_parallel: bool = False,
    saver: AsyncSaver | None = None,
) -> Path:
    """Save everything needed to resume at ``train_state.step``; returns the checkpoint directory.

    Collective: every rank must call it. ``model`` is this rank's (DDP-wrapped) model chunk. SIGTERM /
    SIGINT during the save are delivered after it (:func:`deferred_signals`). With ``saver`` the save is
    asynchronous: this returns once the state is staged and the writer started (after waiting for the
    previous one); the directory is complete when ``saver.poll()`` / ``saver.wait()`` return it.
    """
    if saver is not None:
        saver.wait()
    path = step_dir(save_dir, train_state.step)
    partial = path.with_name(path.name + ".partial")
    with deferred_signals():  # the writer processes forked in here start with SIGTERM / SIGINT blocked
        _start_results_queue_ignoring_sigterm()
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
            partial.mkdir(parents=True)
        dist.barrier()
        gather_params(model)  # overlap_param_gather: the parameters of the last step, not the one before
        sd = _state_dict(model, optimizer, scheduler, train_state, loading=False)
        request = dist_checkpointing.save(
            sd, str(partial), sharded_strategy=_save_strategy(fully_parallel), async_sharded_save=saver is not None,
            content_metadata={**_OPTIM_METADATA, **_layout()},
        )  # fmt: skip
        publish = functools.partial(_publish_step, partial, path, Path(save_dir), train_state.step)
        if saver is None:
            publish()
            return path
        request.add_finalize_fn(publish)
        saver.queue.schedule_async_request(request)
        saver.pending.append(path)
    return path


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer per-parameter state before its sharded state dict is built.

    Without TE/Apex, megatron-core 0.16.1's ``DistributedOptimizer.state_dict`` reads Adam's step from the
    torch optimizer's state (``assert len(steps) == 1``), which is empty before the first step. Megatron's
    own dummy initialisation fills it; the load then overwrites every value (model weights are loaded too).
    """
    from megatron.core.optimizer import distrib_optimizer

    _keep_torch_adam_step(distrib_optimizer)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, distrib_optimizer.DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_torch_adam_steps(optimizer) -> None:
    """Without TE/Apex, megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` gives every parameter's
    torch-Adam state the SAME ``step`` tensor, which Adam then increments once per parameter per step (wrong
    bias correction after a resume). One tensor per parameter, as torch Adam keeps them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in getattr(getattr(opt, "optimizer", None), "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _keep_torch_adam_step(module) -> None:
    """Without TE/Apex, torch Adam keeps a per-parameter ``step`` tensor that megatron-core 0.16.1's
    ``load_parameter_state_from_fully_reshardable`` leaves out of the tensors it hands to
    ``_set_main_param_and_optimizer_states``, which then raises KeyError('step'). The step is already
    restored from the param groups by ``DistributedOptimizer.load_state_dict``: keep it. Idempotent."""
    cls = module.DistributedOptimizer
    if module.HAVE_APEX_OR_TE or getattr(cls, "_klong_keeps_step", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if "step" not in tensors and step is not None:
            tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states
    cls._klong_keeps_step = True


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None) -> TrainState:
    """Restore model (and optimizer, scheduler, RNG when given) from a checkpoint directory.

    ``path`` is either one ``iter_*`` directory or a ``save_dir`` holding ``latest``. Raises
    FileNotFoundError naming the path when there is no checkpoint there.
    """
    path = Path(path)
    if (path / "latest").exists():
        path = step_dir(path, latest_step(path))
    if not path.is_dir() or not (path / "metadata.json").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a dist_checkpointing directory or a save_dir)")
    full = optimizer is not None
    if full:
        _materialize_optimizer_state(optimizer)
    metadata = dist_checkpointing.load_content_metadata(str(path)) or {"distrib_optim_sharding_type": "dp_reshardable"}
    saved = {k: metadata.get(k, v) for k, v in _layout().items()}
    same_layout = saved == _layout()
    if full and not same_layout:  # RNG states are per (PP, TP) rank: Megatron skips them on a layout change too
        log.warning("checkpoint %s saved at %s, loading at %s: RNG states not restored", path, saved, _layout())
    sd = _state_dict(
        model, optimizer, scheduler, TrainState() if full else None, loading=True, metadata=metadata, rng=same_layout
    )
    loaded = dist_checkpointing.load(sd, str(path))
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_torch_adam_steps(optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if not full:
        return TrainState()
    if same_layout:
        rng_state = loaded["rng_state"]
        _set_rng_state(rng_state.data if hasattr(rng_state, "data") else rng_state)
    return TrainState(**loaded["train_state"])


def load_model_weights(path: str | Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load only the model weights (reference model, SFT -> RL handoff). See :func:`load_checkpoint`.

    Pass the model's ``optimizer`` when it exists already: in bf16 it keeps fp32 main params copied
    at construction, which its next step would write back over the loaded weights; they are reloaded
    from the model here (``reload_model_params``)."""
    load_checkpoint(path, model)
    if optimizer is not None:
        optimizer.reload_model_params()

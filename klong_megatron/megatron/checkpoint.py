"""Checkpoints with Megatron ``dist_checkpointing``: model, optimizer, LR scheduler, RNG, data position.

Layout of ``save_dir``::

    save_dir/iter_0000020/      one dist_checkpointing directory per saved step
    save_dir/latest             text file: the step of the newest complete checkpoint

A checkpoint is resharded on load (saved at TP=2, loaded at TP=1 works). RNG states are one
``ShardedObject`` per (pipeline, tensor) rank, replicated over data-parallel ranks (all DP ranks share
the seed). The distributed optimizer state is saved ``dp_reshardable``. ``latest`` is written by rank 0
only after every rank finished the save, so a run killed mid-save resumes from the previous one.

For inference (dev server, RL reference model) :func:`load_model_weights` loads only the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


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
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    pp_n, tp_n = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    return ShardedObject("rng_state", state, (pp_n, tp_n), (pp, tp), replica_id=parallel_state.get_data_parallel_rank())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _state_dict(model, optimizer, scheduler, train_state: TrainState | None, *, loading: bool) -> dict:
    model_sd = _unwrap(model).sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        sd["scheduler"] = scheduler.state_dict()
    if train_state is not None:
        sd["train_state"] = vars(train_state).copy()
        sd["rng_state"] = _sharded_rng(None if loading else _rng_state())
    return sd


def save_checkpoint(save_dir: str | Path, model, optimizer, scheduler, train_state: TrainState) -> Path:
    """Save everything needed to resume at ``train_state.step``; returns the checkpoint directory.

    Collective: every rank must call it. ``model`` is this rank's (DDP-wrapped) model chunk.
    """
    path = step_dir(save_dir, train_state.step)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sd = _state_dict(model, optimizer, scheduler, train_state, loading=False)
    dist_checkpointing.save(sd, str(path), content_metadata=_OPTIM_METADATA)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(save_dir) / "latest.tmp"
        tmp.write_text(str(train_state.step))
        tmp.replace(Path(save_dir) / "latest")
    dist.barrier()
    return path


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
    sd = _state_dict(model, optimizer, scheduler, TrainState() if full else None, loading=True)
    loaded = dist_checkpointing.load(sd, str(path))
    _unwrap(model).load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if not full:
        return TrainState()
    _set_rng_state(loaded["rng_state"].data if hasattr(loaded["rng_state"], "data") else loaded["rng_state"])
    return TrainState(**loaded["train_state"])


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model weights (inference: dev server, reference model). See :func:`load_checkpoint`."""
    load_checkpoint(path, model)

"""Process-group setup: torch.distributed (NCCL on GPU, gloo on CPU) + Megatron ``parallel_state``.

Launch modes: a plain ``python`` process (world size 1, a free local port is picked), ``torchrun``
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` from the environment), or ``srun torchrun``
under Slurm (the sbatch script derives the rendezvous from ``SLURM_*``). On CPU the compatibility
layer (:mod:`klong_megatron.megatron.cpu_compat`) is applied before any Megatron state is created.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from klong_megatron.config.cluster import ClusterConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.cpu_compat import apply_cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_devices(cluster: ClusterConfig, cuda_available: bool | None = None) -> None:
    """RuntimeError when ``cluster.require_gpus`` but this process sees no CUDA device (GPUs not requested
    from Slurm, a CPU-only torch build, CUDA_VISIBLE_DEVICES empty): fail fast instead of the CPU path."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cluster.require_gpus and not cuda_available:
        raise RuntimeError(
            f"cluster={cluster.name} expects GPUs (cluster.require_gpus=true) but this process sees none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): request GPUs from Slurm "
            "(GPUS_PER_NODE / --gpus-per-node) and use the GPU image, or run with cluster=local"
        )


def init_distributed(parallel: ParallelConfig, seed: int, *, timeout_min: int = 30) -> None:
    """Initialise torch.distributed, Megatron model parallelism and the RNG trackers (idempotent).

    Raises ValueError when the world size is not a multiple of tp * pp * cp, or ep does not divide
    world / (tp * pp), naming the sizes.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_compat()
        if parallel.cp > 1 or parallel.sequence_parallel:
            raise ValueError("trainer.parallel.cp > 1 and sequence_parallel need GPUs with Transformer Engine")
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend, timeout = ("nccl" if on_gpu else "gloo"), datetime.timedelta(minutes=timeout_min)
        if "RANK" in os.environ:  # torchrun / srun: rendezvous from the environment
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain process: world of one on a free local port (the environment is left untouched)
            init = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend=backend, init_method=init, rank=0, world_size=1, timeout=timeout)
    parallel.data_parallel_size(dist.get_world_size())  # raises when the layout does not fit
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
        )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed CPU, CUDA and Megatron's tensor-parallel RNG trackers (same seed on every DP rank)."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def data_parallel_rank_and_size() -> tuple[int, int]:
    """(rank, size) of this process in its data-parallel group."""
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def is_logging_rank() -> bool:
    """True on global rank 0: the one that prints and writes W&B."""
    return not dist.is_initialized() or dist.get_rank() == 0


def destroy_distributed() -> None:
    """Tear down Megatron state and the default process group (for tests running several trainers)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

"""CPU / gloo compatibility layer for Megatron-Core: the development and CI path.

Megatron-Core assumes CUDA. On a machine without a GPU, :func:`apply_cpu_compat` removes the five
obstacles that stop a real ``GPTModel`` from training through ``get_forward_backward_func``,
Megatron DDP and ``get_megatron_optimizer`` on CPU with ``torch.distributed`` over gloo:

1. RNG: ``CudaRNGStatesTracker`` and ``model_parallel_cuda_manual_seed`` read and write CUDA RNG
   state. The named states become CPU generator states (``torch.cuda.{get,set}_rng_state`` and
   ``torch.cuda.manual_seed`` act on the CPU default generator).
2. ``torch.cuda.current_device()`` (buffers of attention, DDP) resolves to ``"cpu"``.
3. Tensors created with ``device="cuda"`` (optimizer, grad scaler, clip-grad, p2p) are created on
   CPU by a :class:`torch.overrides.TorchFunctionMode` that also makes ``Tensor.cuda()`` a no-op.
4. Type checks such as ``param.grad.type() == "torch.cuda.FloatTensor"`` see the CUDA type name
   of a CPU tensor (the same mode).
5. ``torch.cuda.synchronize`` / streams / events / memory queries become no-ops.

Limits: the mode costs ~15-25% step time on a tiny model (``benchmarks/sft_cpu.py`` measures it);
no sequence parallelism, fused kernels, or Transformer Engine on this path; MoE layers run
with ``model.moe_token_dispatcher=allgather`` only (alltoall waits on CUDA events). The layer is
applied only when ``torch.cuda.is_available()`` is False and never changes behaviour on a GPU:
:func:`apply_cpu_compat` returns False there without touching anything.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_applied = False
_mode: CudaToCpuMode | None = None


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Creates every tensor that asks for a CUDA device on CPU; reports CPU tensors as CUDA types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


def _cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_get_megatron_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _NullStream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return _noop

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def apply_cpu_compat() -> bool:
    """Make Megatron-Core runnable on CPU (idempotent). Call before building any Megatron model.

    Returns True when the layer is active, False on a CUDA machine (nothing is changed there).
    """
    global _applied, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _applied:
            return True
        cuda = torch.cuda
        cuda.get_rng_state = _cpu_get_rng_state
        cuda.set_rng_state = _cpu_set_rng_state
        cuda.manual_seed = torch.manual_seed
        cuda.random.get_rng_state = _cpu_get_rng_state
        cuda.current_device = lambda: "cpu"
        cuda.synchronize = _noop
        cuda.current_stream = lambda *a, **k: _NullStream()
        cuda.default_stream = lambda *a, **k: _NullStream()
        cuda.Stream = _NullStream
        cuda.Event = _NullStream
        cuda.stream = lambda *a, **k: contextlib.nullcontext()
        cuda.memory_allocated = lambda *a, **k: 0
        cuda.max_memory_allocated = lambda *a, **k: 0
        cuda.empty_cache = _noop
        cuda.nvtx.range_push = _noop
        cuda.nvtx.range_pop = _noop

        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_cuda_rng_state = _cpu_get_megatron_rng_state
        mrandom._set_cuda_rng_state = _cpu_set_rng_state
        _mode = CudaToCpuMode()
        _mode.__enter__()
        _applied = True
    return True


def cpu_compat_active() -> bool:
    """True when :func:`apply_cpu_compat` has patched this process."""
    return _applied


@contextlib.contextmanager
def in_this_thread():
    """Enter the device-mapping mode in the calling thread if the layer is active and the thread lacks it.

    Torch function modes are per thread: :func:`apply_cpu_compat` enters the mode in the thread that
    called it, so a worker thread that runs Megatron code (the RL trainer trains in one while its
    rollouts run on the event loop) must enter it too. A no-op on a GPU.
    """
    from torch.overrides import _get_current_function_mode_stack

    if not _applied or any(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack()):
        yield
        return
    with CudaToCpuMode():
        yield


@contextlib.contextmanager
def suspended():
    """Temporarily leave the device-mapping mode (for benchmarks measuring its overhead)."""
    if _mode is None:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()

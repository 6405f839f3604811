"""The weight-update process group between a trainer and its rollout servers (SGLang's protocol).

Dataflow: the trainer is rank 0 and hosts the rendezvous store at ``master_address:master_port``;
each server joins as ranks ``rank_offset .. rank_offset + tp_size - 1`` (``/init_weights_update_group``)
-> for every update the trainer broadcasts each tensor from rank 0, in the order of the request's
``names`` (``/update_weights_from_distributed``), and every server receives into empty tensors of the
request's ``dtypes`` / ``shapes``.

The group is built exactly like SGLang's ``init_custom_process_group`` (the ``tcp://`` rendezvous' store,
``PrefixStore(group_name)``, torch's process-group helper with ``group_name``), so that the store
keys under which NCCL exchanges its unique id match on both sides: a trainer using this module can
feed real SGLang servers, and ``klong-devserver`` receives from it the way SGLang does. The group is
separate from the trainer's default ``torch.distributed`` world (it is never the default group).

Limits: both sides should run the same torch version (the store key layout is torch's); the
process-group helper is private torch API, as in SGLang. The trainer's default group must not be
bound to a device (``init_process_group(device_id=...)``), or torch would try to split the new
NCCL communicator from it.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

BACKENDS = ("nccl", "gloo")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the ``dtypes`` strings of SGLang's request)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; ValueError for a name that is not a torch dtype."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (expected e.g. 'bfloat16', 'float32')")
    return dtype


def init_weight_group(
    *,
    backend: str,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """Join (rank 0: host) the group; blocks until all ``world_size`` ranks have joined or ``timeout_s``.

    ``timeout_s`` also bounds every later collective of the group. Raises ValueError for bad
    arguments and torch's DistNetworkError / RuntimeError when the rendezvous fails.
    """
    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of world_size {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    # What torch's tcp:// rendezvous builds outside torchrun (rendezvous.py _create_c10d_store); built directly
    # because under torchrun (TORCHELASTIC_USE_AGENT_STORE) the rendezvous would make rank 0 a client too.
    store = TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout)  # fmt: skip
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_group(pg: dist.ProcessGroup) -> None:
    dist.destroy_process_group(pg)


def broadcast_tensors(pg: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0: send every tensor, in order (they must be contiguous, on the backend's device)."""
    for t in tensors:
        dist.broadcast(t, src=0, group=pg)


def receive_tensors(
    pg: dist.ProcessGroup,
    dtypes: Sequence[torch.dtype],
    shapes: Sequence[Sequence[int]],
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Ranks > 0: receive one broadcast per (dtype, shape), in order."""
    out = [torch.empty(tuple(shape), dtype=dtype, device=device) for dtype, shape in zip(dtypes, shapes, strict=True)]
    works = [dist.broadcast(t, src=0, group=pg, async_op=True) for t in out]
    for w in works:
        w.wait()
    return out


# ----------------------------------------------------------------------------- weight checker
# SGLang 0.5.23 ``/weights_checker`` (``srt/utils/weight_checker.py``, ``srt/managers/mm_utils.py``
# ``tensor_hash``): per tensor the first 8 bytes of the SHA-256 of its raw bytes as 16 hex digits;
# per GPU the SHA-256 over (name, checksum) in sorted-name order; per engine the SHA-256 over the
# ranks' per-GPU checksums in rank order.


def tensor_checksum(t: torch.Tensor) -> str:
    """SGLang's per-tensor checksum: ``f"{int.from_bytes(sha256(bytes)[:8], 'big'):016x}"``."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{int.from_bytes(hashlib.sha256(memoryview(data)).digest()[:8], 'big'):016x}"


def overall_checksum(checksums: dict[str, str]) -> str:
    """SGLang's ``overall_checksum``: SHA-256 over name + checksum in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(checksums):
        h.update(name.encode())
        h.update(checksums[name].encode())
    return h.hexdigest()


def engine_checksum(per_gpu: Sequence[str]) -> str:
    """SGLang's ``per_engine_checksum``: SHA-256 over the ranks' ``per_gpu_checksum`` strings in order."""
    h = hashlib.sha256()
    for c in per_gpu:
        h.update(c.encode())
    return h.hexdigest()

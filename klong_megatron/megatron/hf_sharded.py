"""Megatron GPT at any TP / PP / EP -> a stream of full HF tensors on global rank 0, one layer at a time.

Dataflow of ``hf_tensor_stream(model, cfg)`` (collective: every rank of the trainer iterates it):
units in HF order (embedding, decoder layers 0..L-1, final norm, output layer) -> the pipeline stage
that owns a unit (``layer_number`` of its layers, first / last stage for the ends; all ranks agree on
the table through one ``all_gather_object``) gathers it: a TP-split parameter (``tensor_model_parallel``,
``partition_dim``) is all-gathered in its TP group (expert parameters in the expert-TP group; a strided
shard, SwiGLU ``linear_fc1``'s ``[gate_r; up_r]``, is gathered per part), expert ``e`` of EP rank ``r`` becomes
global expert ``r * local + e`` (all-gathered in the EP group) -> the stage's lowest global rank holds
the full Megatron tensors of the unit, converts them with ``hf.layer_to_hf`` and sends them to global
rank 0 (``send_object_list`` for names / shapes / dtypes, then one ``send`` per tensor) -> global rank
0 yields ``(HF name, tensor)`` pairs; every other rank yields nothing.

Memory: a rank holds its own shards plus one unit at full size (the largest: an MoE layer with all
its experts); no rank ever holds the whole model. Names and values equal ``hf.hf_tensors`` of the
same weights in one process (tested under torchrun at TP 2, PP 2 and EP 2).

The other direction (``hf.load_hf_weights`` at any layout) uses :func:`global_params` (this rank's
weights under global names, with their full shapes) and :func:`local_shard` (this rank's TP slice of a
full tensor): no communication, each rank reads only its own groups.

Limits: ``moe_grouped_gemm=False`` (SequentialMLP experts); context parallelism does not shard weights
and is ignored; virtual pipeline stages are not supported.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from klong_megatron.config.model import ModelConfig
from klong_megatron.megatron.hf import _unwrap
from klong_megatron.megatron.hf_map import is_weight, layer_to_hf, megatron_to_hf

_EXPERT = ".experts.local_experts."


def _gather(t: torch.Tensor, dim: int, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _tp_layout(name: str, p: torch.Tensor) -> tuple[dist.ProcessGroup, int, int, int, int] | None:
    """(TP group, size, rank, split dim, stride) of a TP-split parameter (expert ones: the expert-TP group),
    None when it is replicated. Stride 2: SwiGLU fc1, each rank holds ``[gate_r; up_r]``."""
    if not getattr(p, "tensor_model_parallel", False):
        return None
    if ".experts." in name:
        group, rank = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank()
    else:
        group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    size = dist.get_world_size(group)
    return group, size, rank, int(getattr(p, "partition_dim", 0)), int(getattr(p, "partition_stride", 1))


def _full(name: str, p: torch.Tensor) -> torch.Tensor:
    """The unsharded Megatron tensor of one (possibly TP-split) parameter; collective over its TP group."""
    layout = _tp_layout(name, p)
    if layout is None:
        return p.detach()
    group, size, _, dim, stride = layout
    return torch.cat([_gather(part, dim, group, size) for part in p.detach().chunk(stride, dim=dim)], dim=dim)


def local_shard(name: str, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's TP slice of ``full`` for parameter ``local`` (global ``name``): inverse of :func:`_full`."""
    layout = _tp_layout(name, local)
    if layout is None:
        return full
    _, size, rank, dim, stride = layout
    return torch.cat([part.chunk(size, dim=dim)[rank] for part in full.chunk(stride, dim=dim)], dim=dim)


def global_params(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """This rank's weights (parameters and persistent buffers, see ``hf_map.is_weight``) under their global
    names (pipeline layer offset, expert offset of this EP rank), each with its full (TP-unsplit) shape."""
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if is_weight(k)}
    n_local = len({int(k.split(_EXPERT, 1)[1].split(".", 1)[0]) for k in state if _EXPERT in k})
    layers = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}." for i, layer in
              enumerate(model.decoder.layers)} if hasattr(model, "decoder") else {}  # fmt: skip
    out: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
    for k, v in state.items():
        name = k
        if k.startswith("decoder.layers."):
            local_prefix = ".".join(k.split(".", 3)[:3]) + "."
            name = layers[local_prefix] + k[len(local_prefix) :]
        if _EXPERT in name and ep > 1:
            head, rest = name.split(_EXPERT, 1)
            e, tail = rest.split(".", 1)
            name = f"{head}{_EXPERT}{ep_rank * n_local + int(e)}.{tail}"
        layout = _tp_layout(name, v)
        shape = list(v.shape)
        if layout is not None:
            shape[layout[3]] *= layout[1]
        out[name] = (v, tuple(shape))
    return out


def _unit_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Full Megatron tensors of one module (``prefix`` + its state-dict names), experts under global ids."""
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    state = {k: v for k, v in module.state_dict(keep_vars=True).items() if is_weight(k)}
    local_experts = {int(k.split(_EXPERT, 1)[1].split(".", 1)[0]) for k in state if _EXPERT in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = _full(k, v)
        if _EXPERT not in k:
            out[prefix + k] = t
            continue
        head, rest = k.split(_EXPERT, 1)
        e, tail = rest.split(".", 1)
        n = len(local_experts)
        parts = [t] if ep == 1 else [torch.empty_like(t) for _ in range(ep)]
        if ep > 1:
            dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
        for r, part in enumerate(parts):
            out[f"{prefix}{head}{_EXPERT}{r * n + int(e) if ep > 1 else ep_rank * n + int(e)}.{tail}"] = part
    return out


def _units(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """This rank's units: name -> (module, Megatron state-dict prefix)."""
    out: dict[str, tuple[torch.nn.Module, str]] = {}
    if getattr(model, "pre_process", True):
        out["embedding"] = (model.embedding, "embedding.")
    for layer in model.decoder.layers:
        g = layer.layer_number - 1
        out[f"layer.{g}"] = (layer, f"decoder.layers.{g}.")
    if getattr(model, "post_process", True):
        out["final_norm"] = (model.decoder.final_layernorm, "decoder.final_layernorm.")
        if getattr(model, "output_layer", None) is not None and model.share_embeddings_and_output_weights is False:
            out["output_layer"] = (model.output_layer, "output_layer.")
    return out


def _to_hf(unit: str, sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    v = cfg.vocab_size
    if unit == "embedding":
        return {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:v]}
    if unit == "final_norm":
        return {"model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if unit == "output_layer":
        return {"lm_head.weight": sd["output_layer.weight"][:v]} if cfg.untie_embeddings else {}
    return layer_to_hf(sd, cfg, int(unit.split(".")[1]))


def _send(out: dict[str, torch.Tensor], dst: int) -> None:
    meta = [[(k, tuple(t.shape), t.dtype) for k, t in out.items()]]
    dist.send_object_list(meta, dst=dst)
    for t in out.values():
        dist.send(t.contiguous(), dst=dst)


def _recv(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    meta: list = [None]
    dist.recv_object_list(meta, src=src)
    out = {}
    for k, shape, dtype in meta[0]:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src)
        out[k] = t
    return out


def hf_tensor_stream(model: torch.nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, full tensor)`` pairs on global rank 0, nothing elsewhere; call on every rank (collective).

    Order: embedding, layers 0..L-1, final norm, lm head (untied only). Tensors keep the model's dtype
    and device (on rank 0: received into the model's device)."""
    model = _unwrap(model)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        sd = {k: v.detach() for k, v in model.state_dict().items() if is_weight(k)}
        yield from megatron_to_hf(sd, cfg).items()
        return
    mine = _units(model)
    rank = dist.get_rank()
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, sorted(mine))
    owner: dict[str, int] = {}
    for r, units in enumerate(table):
        for u in units:
            owner.setdefault(u, r)  # the lowest global rank of the owning stage
    order = ["embedding"] + [f"layer.{i}" for i in range(cfg.num_layers)] + ["final_norm", "output_layer"]
    device = next(model.parameters()).device
    for unit in order:
        if unit not in owner:
            continue  # tied embeddings: no separate output layer
        out: dict[str, torch.Tensor] = {}
        if unit in mine:  # every rank of the owning stage takes part in the gathers
            module, prefix = mine[unit]
            full = _unit_tensors(module, prefix)
            if rank == owner[unit]:
                out = {k: t.contiguous() for k, t in _to_hf(unit, full, cfg).items()}
            del full
        if rank == owner[unit] and rank != 0:
            _send(out, 0)
        elif rank == 0 and owner[unit] != 0:
            out = _recv(owner[unit], device)
        if rank == 0:
            yield from out.items()

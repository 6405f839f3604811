"""Streaming HF <-> Megatron ``dist_checkpointing`` conversion in one process, one parameter at a time.

    hf_to_dist(hf_dir, save_dir, cfg)   # HF safetensors folder -> save_dir/iter_0000000 + latest (model weights)
    dist_to_hf(ckpt, out_dir, cfg)      # a dist checkpoint (save_dir or iter dir) -> HF safetensors + config.json

Dataflow (both directions): ``cfg`` -> a GPTModel built on the ``meta`` device at TP = PP = EP = 1 (shapes,
names and Megatron's own ``sharded_state_dict``, no memory) -> per Megatron parameter, its group of HF tensors
(``hf_map.hf_group``):

- hf-to-dist: Megatron's ``dist_checkpointing.save`` with the torch_dist format, but the writer asks for each
  tensor only when it writes it (a save planner whose ``resolve_data`` reads the group's HF tensors lazily,
  builds the Megatron tensor and returns the slice the checkpoint stores; torch's ``FileSystemWriter`` with
  one thread writes items one by one in plan order). The result is what ``save_checkpoint`` writes for the
  model: ``init_from_checkpoint`` / ``load_checkpoint`` load it at any TP / PP / EP (resharded on load).
- dist-to-hf: the safetensors headers are computed first (the conversion run on meta tensors), then
  parameters are read in batches of at most ``batch_bytes`` (a torch DCP load plan for just their slices of
  the stored, layer-stacked tensors: Megatron's own ``load`` insists on whole stacked tensors), converted and
  appended to the open safetensors file; files are cut at ``max_shard_bytes`` with a
  ``model.safetensors.index.json`` as ``save_pretrained`` writes.

Memory: peak extra RSS is one group for hf-to-dist (the group's HF tensors + its Megatron tensor, e.g. the
padded embedding, or q/k/v + ``linear_qkv``, plus the writer's copy of one tensor) and ``max(largest parameter,
batch_bytes)`` plus one tensor being written for dist-to-hf; never the model. Safetensors go through plain file
I/O (``safetensors_io``), not mmap. Measured: ``benchmarks/convert.py`` (table in the README).

Limits: the meta model is built from ``cfg`` (its spec decides the checkpoint keys; checkpoints of the TE
spec or grouped-GEMM experts are untested here: no GPU); one process only; the vocabulary is padded as ``cfg``
says (``make_vocab_size_divisible_by``; multiply it by the training TP, as ``build_gpt`` does); GLM's MTP layers
are not converted (see ``hf.py``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron.hf_map import exported_names, group_to_hf, group_to_megatron, hf_group, is_weight
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.safetensors_io import SafetensorsDir, SafetensorsWriter


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The whole GPTModel of ``cfg`` on the meta device (parallel state initialised at TP = PP = EP = 1)."""
    if cfg.is_moe:  # the token dispatcher has no weights; alltoall is refused without CUDA
        cfg = dataclasses.replace(cfg, moe_token_dispatcher="allgather")
    with torch.device("meta"):
        model = build_gpt(cfg, parallel=ParallelConfig(), bf16=dtype == torch.bfloat16)
    return model.to(dtype)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _LazyPlanner(MCoreSavePlanner):
    """Megatron's torch_dist save planner, except that a meta tensor is replaced by real data when written."""

    def __init__(self, resolve, **kwargs) -> None:
        super().__init__(**kwargs)
        self._resolve = resolve

    def resolve_data(self, write_item):
        obj = self.lookup_object(write_item.index)
        if isinstance(obj, torch.Tensor) and obj.device.type == "meta":
            return self._resolve(obj)
        return self.transform_object(write_item, obj)


class _StreamingSave(TorchDistSaveShardedStrategy):
    """torch_dist format written synchronously, one tensor at a time (Megatron's own writer stages all)."""

    def __init__(self, resolve) -> None:
        super().__init__("torch_dist", 1)
        self._resolve = resolve

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        planner = _LazyPlanner(self._resolve, dedup_replicated_tensors=False, flatten_state_dict=False)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1)
        dcp.save(mcore_to_pyt_state_dict(sd, False), storage_writer=writer, planner=planner)


def ckpt_partial(save_dir: str | Path) -> Path:
    """Where :func:`hf_to_dist` writes before the checkpoint is complete."""
    return ckpt.step_dir(save_dir, 0).with_name(ckpt.step_dir(save_dir, 0).name + ".partial")


def hf_to_dist(hf_dir: str | Path, save_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, float]:
    """Write the HF checkpoint ``hf_dir`` as the model part of a dist checkpoint ``save_dir/iter_0000000``.

    Needs ``parallel_state`` at TP = PP = EP = 1 (one process). Returns {"tensors", "bytes"} written."""
    hf = SafetensorsDir(hf_dir)
    model = meta_model(cfg, dtype)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    by_storage = {_storage(v): k for k, v in params.items()}
    keys = set(hf)
    last: dict[str, torch.Tensor] = {}
    stats = {"tensors": 0, "bytes": 0}

    def resolve(view: torch.Tensor) -> torch.Tensor:
        name = by_storage[_storage(view)]
        if not is_weight(name):  # router runtime counters: state of a run, saved as zeros
            return torch.zeros(view.shape, dtype=view.dtype)
        if name not in last:  # the slices of one parameter come one after another (plan order): keep one
            last.clear()
            g = hf_group(name, cfg, params, keys)
            full = group_to_megatron(g, hf, cfg, rows=params[name].shape[0] if g.kind == "vocab" else None)
            if full.shape != params[name].shape:
                raise ValueError(f"{hf_dir}: {name} has shape {tuple(full.shape)}, the model config expects "
                                 f"{tuple(params[name].shape)}")  # fmt: skip
            last[name] = full.to(dtype)
        stats["tensors"] += 1
        stats["bytes"] += view.numel() * view.element_size()
        return last[name].as_strided(view.shape, view.stride(), view.storage_offset())

    step, partial = ckpt.step_dir(save_dir, 0), ckpt_partial(save_dir)
    partial.mkdir(parents=True, exist_ok=True)
    sd, layout = {"model": model.sharded_state_dict()}, {"tp": 1, "pp": 1}
    dist_checkpointing.save(sd, str(partial), _StreamingSave(resolve), content_metadata=layout)
    ckpt._publish(partial, step)
    (Path(save_dir) / "latest").write_text("0")
    return stats


def checkpoint_dir(path: str | Path) -> Path:
    """The ``iter_*`` directory of ``path`` (itself, or the newest of a save_dir); FileNotFoundError if none."""
    path = Path(path)
    if (path / "latest").exists():
        path = ckpt.step_dir(path, ckpt.latest_step(path))
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"no dist checkpoint at {path} (expected an iter_* directory or a save_dir)")
    return path


def stored_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{checkpoint key: (global shape, dtype)} from the torch_dist metadata of checkpoint dir ``path``."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items() if hasattr(m, "size")}


def fit_vocab(cfg: ModelConfig, stored: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> ModelConfig:
    """``cfg`` with the padded vocabulary of the checkpoint (which TP the run padded for is not in ``cfg``)."""
    rows = stored["embedding.word_embeddings.weight"][0][0]
    if rows < cfg.vocab_size:
        raise ValueError(f"checkpoint embedding has {rows} rows, fewer than model vocab_size={cfg.vocab_size}")
    return cfg if rows == cfg.padded_vocab_size() else dataclasses.replace(cfg, make_vocab_size_divisible_by=rows)


class _SliceReader(DefaultLoadPlanner):
    """Reads given slices of stored tensors into given tensors (``requests``: checkpoint key, global offset,
    destination); the torch_dist reader fetches only the stored chunks that overlap them."""

    def __init__(self, requests: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False)
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (key, offset, t) in enumerate(self.requests):
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=t.shape)
            reads = create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            items += [dataclasses.replace(r, dest_index=dataclasses.replace(r.dest_index, fqn=f"{i}")) for r in reads]
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        t = self.requests[int(read_item.dest_index.fqn)][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            t = t.narrow(dim, start, length)
        return t


def _read_params(path: Path, pieces: dict[str, list], metas: dict[str, torch.Tensor], names: list[str]):
    """Real tensors of parameters ``names`` from checkpoint ``path`` (``pieces``: a parameter's ShardedTensors
    after Megatron's factories, whose meta ``data`` are views of the meta parameter ``metas[name]``)."""
    out = {n: torch.empty_like(metas[n], device="cpu") for n in names}
    requests = []
    for n in names:
        for sh in pieces[n]:
            d, p = sh.data, sh.prepend_axis_num
            dest = out[n].as_strided((1,) * p + tuple(d.shape), (0,) * p + d.stride(), d.storage_offset())
            requests.append((sh.key, tuple(sh.global_offset), dest))
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(path)), planner=_SliceReader(requests))
    return out


def _plan_files(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list]:
    files: list[list] = [[]]
    size = 0
    for e in entries:
        n = torch.Size(e[1]).numel() * e[2].itemsize
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += n
    return files


def _batches(names: list[str], shapes: dict[str, torch.Tensor], batch_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for n in names:
        b = shapes[n].numel() * shapes[n].element_size()
        if batch and size + b > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(n)
        size += b
    if batch:
        yield batch


def dist_to_hf(
    path: str | Path, out_dir: str | Path, cfg: ModelConfig, *, max_shard_bytes: int = 5 << 30,
    batch_bytes: int = 512 << 20,
) -> dict[str, object]:  # fmt: skip
    """Write the model weights of dist checkpoint ``path`` as HF safetensors into ``out_dir`` (no config.json:
    see :func:`klong_megatron.megatron.hf.hf_config`). Checkpoint dtypes are kept.

    Returns {"tensors", "bytes", "dtype" (of the embedding)}."""
    path = checkpoint_dir(path)
    stored = stored_shapes(path)
    cfg = fit_vocab(cfg, stored)
    model = meta_model(cfg)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    by_storage = {_storage(v): k for k, v in params.items()}
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    pieces: dict[str, list] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            pieces.setdefault(by_storage[_storage(sh.data)], []).append(sh)
    names = exported_names(pieces, cfg)
    metas = {}
    for n in names:
        key = pieces[n][0].key
        if key not in stored:
            raise KeyError(f"{path}: checkpoint has no {key} (model config vs checkpoint)")
        metas[n] = params[n].to(stored[key][1])
    entries = [(k, tuple(t.shape), t.dtype) for n in names
               for k, t in group_to_hf(hf_group(n, cfg, names), metas[n], cfg).items()]  # fmt: skip
    plan = _plan_files(entries, max_shard_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                                          for i in range(len(plan))]  # fmt: skip
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(torch.Size(s).numel() * d.itemsize for _, s, d in entries)},
                 "weight_map": {e[0]: f for f, p in zip(files, plan, strict=True) for e in p}}  # fmt: skip
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    writers = iter(SafetensorsWriter(out / f, p) for f, p in zip(files, plan, strict=True))
    current = next(writers)
    stats: dict[str, object] = {"tensors": 0, "bytes": 0, "dtype": str(metas[names[0]].dtype).removeprefix("torch.")}
    for batch in _batches(names, metas, batch_bytes):
        loaded = _read_params(path, pieces, metas, batch)
        for n in batch:
            for k, t in group_to_hf(hf_group(n, cfg, names), loaded[n], cfg).items():
                if not current.pending:
                    current = next(writers)
                current.write(k, t)
                stats["tensors"] += 1
                stats["bytes"] += t.numel() * t.element_size()
        del loaded
    return stats

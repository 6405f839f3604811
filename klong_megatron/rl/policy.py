"""The RL policy on Megatron-Core: old/reference log-probs and GRPO updates over packed window rows.

Dataflow of ``update(rows)``: rows (``rl/windows.pack_rows``, identical on every rank) -> this
data-parallel rank's share (padded with zero-loss rows so every rank runs the same number of
micro-batches) -> old log-probs with the current weights (forward only) and, when ``algo.kl_coef``
> 0, reference log-probs with the frozen initial policy -> unknown rollout log-probs replaced by the
old ones (TIS weight 1) -> ``epochs`` passes of mini-batches of ``trainer.global_batch_size`` rows:
``get_forward_backward_func`` with the RL loss (``megatron/rl_loss.py``: per-token sums, gradients
divided by the global trained-token count) -> optimizer + LR scheduler step -> metrics reduced over DP.

Sharded policies (TP / PP / EP > 1): the HF export and the weight push are collective
(``megatron/hf_sharded.py``: each rank contributes its shards, rank 0 writes or sends); with PP the
windows go through Megatron's pipeline schedule and the loss metrics come from the last stage.

Temperatures: each row carries the sampling temperature of every label (``rl/windows.py``); old and
reference log-probs and TIS are computed at it (unknown ones: ``rollout.sampling.temperature``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from klong_megatron.config.rl import RLConfig
from klong_megatron.data.dataset import block_causal_mask, collate
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron.model import build_gpt, uses_packed_seq_params
from klong_megatron.megatron.parallel import data_parallel_rank_and_size, init_distributed
from klong_megatron.megatron.rl_loss import make_logprob_forward_step, make_rl_forward_step, reduce_rl_reports
from klong_megatron.megatron.training import build_training_model, gather_params, resolve_bf16
from klong_megatron.rl.windows import GREEDY_EPS
from klong_megatron.sft.batches import thd_batch_for_cp_rank, thd_unpartition

Row = dict[str, Any]
RL_TOKEN_KEYS = (
    "tokens", "labels", "loss_mask", "position_ids", "advantages", "old_logprobs", "ref_logprobs", "rollout_logprobs",
    "temperatures",
)  # fmt: skip


def _to_batch(rows: list[Row], attention: str) -> dict[str, Any]:
    items = [
        {k: torch.from_numpy(np.asarray(r[k])) for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens")}
        | {"trajectory_ids": r["trajectory_ids"]}
        for r in rows
    ]
    batch = collate(items, attention=attention)
    for key in ("advantages", "rollout_logprobs", "old_logprobs", "ref_logprobs", "temperatures"):
        if key in rows[0]:
            batch[key] = torch.from_numpy(np.stack([np.asarray(r[key], np.float32) for r in rows]))
    return batch


def thd_rl_micro_batch(
    batch: dict[str, Any], cp: int, cp_rank: int, *, sequence_parallel_tp: int = 1, block_mask: bool = False
) -> dict[str, Any]:
    """A collated THD RL micro-batch ``[B, S]`` as CP rank ``cp_rank`` feeds it to the model: flat ``[1, T / cp]``.

    Every window padded to a multiple of 2*CP (``cu_seqlens_padded``) and this rank's chunks kept of every
    per-token tensor (``RL_TOKEN_KEYS``; ``[B]`` advantages are first spread over their row's tokens), exactly as
    the SFT batches (``sft.batches.thd_batch_for_cp_rank``). ``block_mask``: add the ``[1, 1, T, T]`` block
    mask the local spec needs (CP 1 only: attention across CP ranks needs Transformer Engine).
    """
    batch = dict(batch)
    if batch["advantages"].dim() == 1:
        batch["advantages"] = batch["advantages"].unsqueeze(-1).expand_as(batch["loss_mask"])
    batch["real"] = torch.ones_like(batch["loss_mask"])
    keys = (*(k for k in RL_TOKEN_KEYS if batch.get(k) is not None), "real")
    out = thd_batch_for_cp_rank(batch, cp, cp_rank, sequence_parallel_tp=sequence_parallel_tp, keys=keys)
    real = out.pop("real") > 0
    if "temperatures" in out:  # padding tokens sample at temperature 1, not 0 (no division by zero)
        out["temperatures"] = torch.where(real, out["temperatures"], torch.ones_like(out["temperatures"]))
    if block_mask:
        assert cp == 1, "the local spec's block mask cannot attend across context-parallel ranks"
        out["attention_mask"] = block_causal_mask(out["cu_seqlens_padded"], out["tokens"].shape[1])[None]
    return out


def gather_thd_tokens(local: torch.Tensor, batch: dict[str, Any], group: dist.ProcessGroup | None) -> torch.Tensor:
    """Per-token values ``[1, T / cp]`` of one :func:`thd_rl_micro_batch` on every CP rank of ``group`` ->
    ``[1, B * S]`` in the collated order (padding dropped). Collective over ``group`` when it has > 1 rank."""
    parts = [local]
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
    return thd_unpartition(parts, batch["cu_seqlens"], batch["cu_seqlens_padded"])


class Policy:
    """Megatron model + optimizer of the RL run (every rank builds one)."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        t = cfg.trainer
        self.te_packing = uses_packed_seq_params(cfg.model)
        if t.parallel.cp > 1 and not self.te_packing:
            raise ValueError(
                f"trainer.parallel.cp={t.parallel.cp} needs Transformer Engine's packed (THD) attention on GPUs "
                f"(model.transformer_impl={cfg.model.transformer_impl!r} resolves to the local spec here)"
            )
        init_distributed(t.parallel, t.seed)
        self.model, self.optimizer, self.scheduler = build_training_model(cfg.model, t, init_from_hf=cfg.init_from_hf)
        if cfg.init_from_checkpoint:
            self.load_weights(cfg.init_from_checkpoint)
        self.attention = "thd" if self.te_packing or t.packed_format == "thd" else "mask"
        self.dp_rank, self.dp_size = data_parallel_rank_and_size()
        self.ref: torch.nn.Module | None = None
        self.steps = 0

    # ----- weights -----------------------------------------------------------------------------
    def load_weights(self, path: str | Path) -> None:
        """Model weights only from a dist checkpoint (a klong-sft run's ``checkpoints`` dir or one step).

        The optimizer's fp32 main parameters (bf16 runs, distributed optimizer) are refreshed from the
        loaded weights; otherwise its next step would write the weights from before the load back."""
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        ckpt.load_model_weights(path, self.model, self.optimizer)  # bf16: fp32 main params reloaded too
        self.optimizer.reload_model_params()

    def scale_lr(self, factor: float) -> float:
        """Multiply the learning-rate schedule (max and min) by ``factor``; returns the new max lr.

        Kept in the scheduler and the optimizer's param groups, so checkpoints carry it on resume."""
        sched = self.scheduler
        sched.max_lr, sched.min_lr = sched.max_lr * factor, sched.min_lr * factor
        for group in self.optimizer.param_groups:
            for key in ("max_lr", "min_lr", "lr"):
                if key in group:
                    group[key] *= factor
        return sched.max_lr

    def freeze_reference(self, ref_dir: str | Path) -> None:
        """The reference model (KL penalty) = the weights in ``ref_dir`` if saved there, else the current
        weights, saved to ``ref_dir`` so that a resumed run gets the same reference. Collective."""
        ref = build_gpt(self.cfg.model, parallel=self.cfg.trainer.parallel, bf16=resolve_bf16(self.cfg.trainer))
        if ckpt.latest_step(ref_dir) is None:
            ckpt.save_checkpoint(ref_dir, self.model, None, None, ckpt.TrainState())
        ckpt.load_model_weights(ref_dir, ref)
        ref.requires_grad_(False).eval()
        self.ref = ref

    def save(self, save_dir: str | Path, version: int) -> Path:
        return ckpt.save_checkpoint(
            save_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            ckpt.TrainState(step=self.steps, consumed_samples=version),
        )

    def load(self, save_dir: str | Path) -> int:
        """Restore model, optimizer, scheduler and RNG; returns the saved policy version."""
        state = ckpt.load_checkpoint(save_dir, self.model, self.optimizer, self.scheduler)
        self.steps = state.step
        return state.consumed_samples

    @property
    def sharded(self) -> bool:
        """Weights split over ranks (trainer.parallel tp, pp or ep > 1): HF exports and pushes are collective."""
        p = self.cfg.trainer.parallel
        return max(p.tp, p.pp, p.ep) > 1

    def export_hf(self, out_dir: str | Path, tokenizer: Any) -> Path:
        """The policy as an HF checkpoint in ``out_dir`` (what the servers load from disk).

        Sharded: collective (every rank calls it, each sends its shards through
        ``hf_sharded.hf_tensor_stream``; global rank 0 gathers the tensors in host memory and writes them,
        the others return ``out_dir`` once it is written)."""
        from klong_megatron.megatron.hf import export_hf, write_hf_dir
        from klong_megatron.megatron.hf_sharded import hf_tensor_stream

        if not self.sharded:
            return export_hf(self.model, self.cfg.model, out_dir, tokenizer)
        tensors = {k: v.cpu() for k, v in hf_tensor_stream(self.model, self.cfg.model)}
        try:
            if dist.get_rank() == 0:
                write_hf_dir(tensors, self.cfg.model, out_dir, tokenizer)
        finally:  # a failed write (disk full) raises on rank 0 after the others are released
            del tensors
            dist.barrier()
        return Path(out_dir)

    def contribute_shards(self) -> None:
        """Sharded policy, ranks other than 0: send this rank's shards to rank 0's weight push
        (``rl.weight_sync.DistributedWeightSync.push_model``), which runs at the same time."""
        from klong_megatron.rl.weight_sync import contribute_shards

        contribute_shards(self.model, self.cfg.model)

    # ----- forward passes ----------------------------------------------------------------------
    def _local(self, rows: list[Row]) -> list[Row]:
        """This DP rank's rows, padded with zero-loss copies to a multiple of micro x (global / DP)."""
        mbs = self.cfg.trainer.micro_batch_size
        per_rank = math.ceil(len(rows) / self.dp_size)
        per_rank = math.ceil(per_rank / mbs) * mbs
        local = rows[self.dp_rank :: self.dp_size]
        pad = dict(rows[0]) | {"loss_mask": np.zeros_like(rows[0]["loss_mask"]), "trajectory_ids": []}
        return local + [pad] * (per_rank - len(local))

    def _micro(self, rows: list[Row]) -> list[dict[str, Any]]:
        mbs = self.cfg.trainer.micro_batch_size
        batches = [_to_batch(rows[i : i + mbs], self.attention) for i in range(0, len(rows), mbs)]
        if self.attention != "thd":
            return batches
        p = self.cfg.trainer.parallel
        cp_rank, sp_tp = parallel_state.get_context_parallel_rank(), p.tp if p.sequence_parallel else 1
        return [
            thd_rl_micro_batch(b, p.cp, cp_rank, sequence_parallel_tp=sp_tp, block_mask=not self.te_packing)
            for b in batches
        ]

    def _run(self, model: torch.nn.Module, step_fn: Any, mbs: list[dict[str, Any]], *, forward_only: bool):
        return get_forward_backward_func()(
            forward_step_func=step_fn,
            data_iterator=iter(mbs),
            model=[model],
            num_microbatches=len(mbs),
            seq_length=mbs[0]["tokens"].shape[-1],
            micro_batch_size=self.cfg.trainer.micro_batch_size,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, rows: list[Row], *, reference: bool = False) -> list[np.ndarray]:
        """Per-row log-prob of ``labels`` (float32 [S]) under the current (or reference) weights.

        Call with this rank's rows. Non-last pipeline stages get zeros (they never use them).
        """
        a = self.cfg.algo
        model = self.ref if reference else self.model
        if model is None:
            raise ValueError("no reference model: call freeze_reference() first")
        model.eval()
        mbs = self._micro(rows)
        out = self._run(model, make_logprob_forward_step(chunk_size=a.logprob_chunk_size, temperature=a.temperature),
                        mbs, forward_only=True)  # fmt: skip
        model.train()
        seq = len(rows[0]["tokens"])
        if not parallel_state.is_pipeline_last_stage():
            return [np.zeros(seq, np.float32) for _ in rows]
        if self.attention == "thd":  # this CP rank's padded tokens -> every row's [S] (all-gather over CP)
            cp_group = parallel_state.get_context_parallel_group()
            out = [{"logprobs": gather_thd_tokens(o["logprobs"], mb, cp_group)} for o, mb in zip(out, mbs, strict=True)]
        flat = torch.cat([o["logprobs"].reshape(-1, seq) for o in out]).float().cpu().numpy()
        return list(flat)

    def update(self, rows: list[Row]) -> dict[str, float]:
        """``epochs`` x mini-batch optimizer steps on ``rows`` (same list on every rank); returns step means."""
        t = self.cfg.trainer
        local = [with_temperatures(r, self.cfg.rollout.sampling.temperature) for r in self._local(rows)]
        old = self.logprobs(local)
        ref = self.logprobs(local, reference=True) if self.cfg.algo.kl_coef > 0 else None
        for i, r in enumerate(local):
            r = local[i] = dict(r)
            r["old_logprobs"] = old[i]
            lp = np.asarray(r["rollout_logprobs"], np.float32)
            r["rollout_logprobs"] = np.where(np.isnan(lp), old[i], lp)
            if ref is not None:
                r["ref_logprobs"] = ref[i]
        per_step = max(t.micro_batch_size, t.global_batch_size // self.dp_size)
        reports: list[dict] = []
        grad_norms: list[float] = []
        for _ in range(self.cfg.rl.epochs):
            for s in range(0, len(local), per_step):
                self.model.zero_grad_buffer()
                self.optimizer.zero_grad()
                reports += self._run(self.model, make_rl_forward_step(self.cfg.algo),
                                     self._micro(local[s : s + per_step]), forward_only=False)  # fmt: skip
                _, grad_norm, _ = self.optimizer.step()
                self.scheduler.step(increment=1)
                grad_norms.append(float(grad_norm or 0.0))
                self.steps += 1
        gather_params(self.model)  # overlap_param_gather: exports, pushes and saves read the updated weights
        metrics = reduce_rl_reports(reports, parallel_state.get_data_parallel_group(with_context_parallel=True))
        metrics["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        metrics["optimizer_steps"] = float(len(grad_norms))
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return from_last_pipeline_stage(metrics)


def with_temperatures(row: Row, default: float) -> Row:
    """``row`` whose ``temperatures`` (each label's sampling temperature) has no NaN: unknown ones (records
    written before temperatures were recorded, padding) are ``default`` (the configured sampling temperature);
    a row without the key gets ``default`` everywhere. Old/reference log-probs and TIS then use each
    rollout's own temperature: SGLang reports ``log_softmax(logits / T)``."""
    t = np.asarray(row.get("temperatures", np.full(len(row["tokens"]), np.nan)), np.float32)
    default = 1.0 if default < GREEDY_EPS else default
    return dict(row) | {"temperatures": np.where(np.isnan(t), np.float32(default), t)}


def from_last_pipeline_stage(obj: Any) -> Any:
    """``obj`` of this pipeline's last stage on all its stages (the loss metrics exist there only); identity at
    PP 1. Collective over the pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    return box[0]


def broadcast_object(obj: Any) -> Any:
    """``obj`` from global rank 0 on every rank (identity in a one-process world)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""Trajectory-splitting SFT on Megatron-Core: the training loop (controller layer).

Dataflow per step: SampleOrder -> global batch of packed windows -> this DP rank's micro-batches ->
``get_forward_backward_func`` (per-token loss over the window loss masks; gradients divided by the
trained tokens of the whole global batch) -> Megatron DDP grad sync -> ``get_megatron_optimizer``
(Adam, clip, optional distributed optimizer, bf16 on GPU) -> warmup + cosine LR
(``OptimizerParamScheduler``) -> metrics -> checkpoint.

Stops: ``train_steps`` reached; ``exit_after_steps`` steps done in this process; SIGTERM / SIGINT
(Slurm preemption, Ctrl-C), agreed by all ranks after the current step. Each saves a checkpoint
first. A signal that arrives while a checkpoint is being written waits for the save to finish
(``checkpoint.deferred_signals``); after a periodic save the run stops at once, without another step.
A non-finite loss raises :class:`NonFiniteLossError` naming the step and the trajectory ids.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from klong_megatron.config.sft import SFTConfig
from klong_megatron.logging import MetricsLogger
from klong_megatron.megatron import checkpoint as ckpt
from klong_megatron.megatron.model import uses_packed_seq_params
from klong_megatron.megatron.parallel import (
    check_devices,
    data_parallel_rank_and_size,
    init_distributed,
    is_logging_rank,
)
from klong_megatron.megatron.step import make_forward_step
from klong_megatron.megatron.training import build_training_model, resolve_bf16
from klong_megatron.sft.batches import BatchPlan, GlobalBatches, eval_batches, micro_batches, thd_batch_for_cp_rank
from klong_megatron.sft.metrics import flops_from_sums


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN/inf; the message names the step and the batch's trajectory ids."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; ranks agree on it with an all-reduce after each step."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> int:
        flag = torch.tensor([self.signum], dtype=torch.int64, device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class SFTTrainer:
    """One SFT run over the data pipeline's packed windows.

    ``data`` overrides the pipeline (tests, custom corpora): a dict with ``train``, ``valid`` (datasets
    of packed items), ``collate(samples, attention)`` and ``order(num_samples, seed)`` (an object with
    ``indices(start)``, the ``SampleOrder`` contract). Default: ``sft_data(cfg.data)`` (in memory or prepared).
    """

    def __init__(self, cfg: SFTConfig, output_dir: str | Path, data: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.tcfg = cfg.trainer
        self.bf16 = resolve_bf16(self.tcfg)
        self.thd = self.tcfg.packed_format == "thd" or uses_packed_seq_params(cfg.model)
        """Micro-batches are flat packed sequences [1, mbs*S] (Transformer Engine's THD layout)."""
        check_devices(cfg.cluster)
        init_distributed(self.tcfg.parallel, self.tcfg.seed)
        self.train_ds, self.valid_ds, self.collate, self._order = self._datasets(data)
        dp_rank, dp_size = data_parallel_rank_and_size()
        self.plan = BatchPlan(self.tcfg.global_batch_size, self.tcfg.micro_batch_size, dp_size, dp_rank)
        self.save_dir = Path(self.tcfg.save_dir or self.out / "checkpoints")
        self.saver = ckpt.AsyncSaver() if self.tcfg.async_save else None
        self.seq_len = cfg.data.seq_len or cfg.data.policy.max_len
        self.model, self.optimizer, self.scheduler = build_training_model(
            self.cfg.model, self.tcfg, init_from_hf=self.cfg.init_from_hf
        )
        self.state = ckpt.TrainState()
        self.logger: MetricsLogger | None = None
        self.last_metrics: dict[str, float] = {}
        self.loss_history: list[float] = []
        """Training loss of every step run by this process."""
        self._batch_ids: list[list[str]] = []

    # ----- setup -------------------------------------------------------------------------------
    def _datasets(self, data: dict[str, Any] | None):
        if data is None:
            from klong_megatron.sft.data import sft_data

            data = sft_data(self.cfg.data)
        self.data_info: dict[str, Any] = data.get("info", {})
        train, valid, collate_fn = data["train"], data["valid"], data["collate"]
        if len(train) == 0:
            raise ValueError("the training split is empty: check data.train_files / data.policy")
        vocab = getattr(train, "vocab_size", None)
        if vocab is not None and vocab > self.cfg.model.vocab_size:
            raise ValueError(
                f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the tokenizer "
                f"({vocab} tokens, data.tokenizer={self.cfg.data.tokenizer!r})"
            )
        if not self.thd:
            return train, valid, (lambda samples: collate_fn(samples, attention="mask")), data["order"]
        thd_collate = lambda samples: self._thd_micro_batch(collate_fn(samples, attention="thd"))  # noqa: E731
        return train, valid, thd_collate, data["order"]

    def _thd_micro_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated THD micro-batch as this context-parallel rank feeds it to the model (flat ``[1, T / cp]``)."""
        p = self.tcfg.parallel
        cp_rank = parallel_state.get_context_parallel_rank()
        out = thd_batch_for_cp_rank(batch, p.cp, cp_rank, sequence_parallel_tp=p.tp if p.sequence_parallel else 1)
        if not uses_packed_seq_params(self.cfg.model):  # local spec: the flat sequence under a block mask
            from klong_megatron.data.dataset import block_causal_mask

            out["attention_mask"] = block_causal_mask(out["cu_seqlens_padded"], out["tokens"].shape[1])[None]
        return out

    def _maybe_resume(self) -> None:
        t = self.tcfg
        if t.resume_from:
            if not Path(t.resume_from).exists():
                raise FileNotFoundError(f"trainer.resume_from={t.resume_from!r} does not exist")
            self.state = ckpt.load_checkpoint(t.resume_from, self.model, self.optimizer, self.scheduler)
        elif t.resume and ckpt.latest_step(self.save_dir) is not None:
            self.state = ckpt.load_checkpoint(self.save_dir, self.model, self.optimizer, self.scheduler)
        else:
            return
        self._log_info(f"resumed at step {self.state.step} (consumed_samples {self.state.consumed_samples})")

    # ----- one step ----------------------------------------------------------------------------
    def _collate_counting_windows(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate`` that also adds each real window's length n to ``sum n`` and ``sum n^2`` (for FLOPs)."""
        for s in samples:
            lengths = torch.diff(s["cu_seqlens"].long())[: len(s["trajectory_ids"])].double()  # not the padding
            self._window_sums += torch.stack([lengths.sum(), (lengths * lengths).sum()])
        return self.collate(samples)

    def _run_batch(self, global_indices: list[int], dataset, *, forward_only: bool) -> tuple[float, float, float]:
        """Forward(+backward) one global batch. Returns (loss mean over trained tokens, trained tokens, windows);
        ``self.window_sums`` becomes (sum n, sum n^2) over the batch's windows (all DP ranks)."""
        local = self.plan.local_slice(global_indices)
        self._window_sums = torch.zeros(2, dtype=torch.float64)
        mbs = micro_batches(dataset, local, self.plan.micro_batch_size, self._collate_counting_windows)
        windows = float(sum(len(ids) for mb in mbs for ids in mb["trajectory_ids"]))
        self._batch_ids = [ids for mb in mbs for ids in mb["trajectory_ids"]]
        # pipeline buffers: (S, mbs, H) for rows; (mbs*S, 1, H) for a flat THD sequence (Megatron divides by CP)
        seq_length, mbs_size = (
            (self.seq_len * self.plan.micro_batch_size, 1) if self.thd else (self.seq_len, self.plan.micro_batch_size)
        )
        out = get_forward_backward_func()(
            forward_step_func=make_forward_step(),
            data_iterator=iter(mbs),
            model=[self.model],
            num_microbatches=len(mbs),
            seq_length=seq_length,
            micro_batch_size=mbs_size,
            forward_only=forward_only,
        )
        totals = torch.zeros(5, dtype=torch.float64, device=_device())
        if parallel_state.is_pipeline_last_stage():
            for item in out:  # this CP rank's share of the tokens; the CP ranks' sums add up below
                totals[:2] += item["lm loss"].to(totals)
            if parallel_state.get_context_parallel_rank() == 0:
                totals[2] = windows
                totals[3:] = self._window_sums.to(totals)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
        loss_sum, tokens, windows, *self.window_sums = totals.tolist()
        return loss_sum / max(tokens, 1.0), tokens, windows

    def train_step(self) -> dict[str, float]:
        indices = self.batches.next()
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss, tokens, windows = self._run_batch(indices, self.train_ds, forward_only=False)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss {loss} at step {self.state.step + 1}; trajectory ids of this rank's part of "
                f"the batch: {sorted({i for ids in self._batch_ids for i in ids})}"
            )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        elapsed = time.perf_counter() - start
        self.state.step += 1
        self.state.consumed_samples = self.batches.consumed_samples
        seq_tokens = self.tcfg.global_batch_size * self.seq_len
        metrics = {
            "loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
            "tokens_per_s": seq_tokens / elapsed, "windows": windows, "trained_tokens": tokens,
            "step_time_s": elapsed,
        }  # fmt: skip
        # model FLOPs of the real windows (attention per window, padding not counted), per device
        tflops = flops_from_sums(self.cfg.model, *self.window_sums) / elapsed / 1e12
        metrics["tflops"] = tflops / dist.get_world_size()
        if self.cfg.cluster.peak_tflops:  # the datasheet dense bf16 peak (cluster presets)
            metrics["mfu"] = metrics["tflops"] / self.cfg.cluster.peak_tflops
        return metrics

    def evaluate(self) -> float:
        """Held-out loss: mean over the trained tokens of ``trainer.eval_batches`` global batches."""
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return float("nan")
        loss_sum = tokens = 0.0
        for indices in eval_batches(len(self.valid_ds), self.tcfg.global_batch_size, self.tcfg.eval_batches):
            loss, n, _ = self._run_batch(indices, self.valid_ds, forward_only=True)
            loss_sum, tokens = loss_sum + loss * n, tokens + n
        return loss_sum / max(tokens, 1.0)

    # ----- the run -----------------------------------------------------------------------------
    def _log_info(self, message: str) -> None:
        if self.logger is not None:
            self.logger.info(message)

    def _log_mix(self) -> None:
        """A blend's mix per source: planned share and epochs per cycle, realised ones after the samples consumed."""
        order = self.data_info.get("blend_order")
        if order is None or self.logger is None:
            return
        from klong_megatron.prepared.blend import mix_table

        rows = mix_table([r["source"] for r in self.data_info["blend"]], order, self.state.consumed_samples)
        for d, row in enumerate(rows):
            text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            self._log_info(f"blend source {d}: {text}")
            mix = {f"source{d}_{k}": float(v) for k, v in row.items() if k.startswith(("share", "realised"))}
            self.logger.log(self.state.step, mix, prefix="blend")

    def save(self) -> Path:
        t = self.tcfg
        self._published(wait=True)  # the previous background save first (one in flight)
        path = ckpt.save_checkpoint(self.save_dir, self.model, self.optimizer, self.scheduler, self.state,
                                    fully_parallel=t.fully_parallel_save, saver=self.saver)  # fmt: skip
        self._log_info(f"writing checkpoint {path} in the background" if self.saver else f"saved checkpoint {path}")
        return path

    def _published(self, *, wait: bool) -> None:
        """Async saves: log the checkpoints that became complete (``wait``: block for the one in flight)."""
        if self.saver is not None:
            for path in self.saver.wait() if wait else self.saver.poll():
                self._log_info(f"saved checkpoint {path}")

    def run(self, logger: MetricsLogger | None = None) -> dict[str, Any]:
        """Train to ``train_steps`` (or a stop); returns the final state, last metrics and how it ended."""
        t = self.tcfg
        self.logger = logger or MetricsLogger(self.cfg.logger, enabled=is_logging_rank(), run_dir=self.out)
        self._maybe_resume()
        order = self._order(len(self.train_ds), self.cfg.data.seed)
        self.batches = GlobalBatches(order.indices, t.global_batch_size, self.state.consumed_samples)
        stop, steps_here, ended, saved_step, stopped_by = _StopFlag(), 0, "completed", None, 0
        stop.install()
        try:
            while self.state.step < t.train_steps:
                metrics = self.train_step()
                self._published(wait=False)
                steps_here += 1
                self.loss_history.append(metrics["loss"])
                step = self.state.step
                if step % t.log_every == 0 or step == t.train_steps:
                    self.logger.log(step, metrics)
                self.last_metrics = metrics
                if t.eval_every and (step % t.eval_every == 0 or step == t.train_steps):
                    self.last_metrics["eval_loss"] = self.evaluate()
                    self.logger.log(step, {"loss": self.last_metrics["eval_loss"]}, prefix="eval")
                if step == t.train_steps:
                    break
                if stopped_by := stop.agreed():
                    break
                if t.exit_after_steps is not None and steps_here >= t.exit_after_steps:
                    ended = f"exit_after_steps={t.exit_after_steps}"
                    break
                if t.save_every and step % t.save_every == 0:
                    self.save()
                    saved_step = step
                    if stopped_by := stop.agreed():  # arrived during the save: the checkpoint is current
                        break
            if saved_step != self.state.step:
                self.save()
            self._published(wait=True)
        finally:
            stop.restore()
        if stopped_by:
            ended = f"signal {signal.Signals(stopped_by).name}"
        elif stop.signum:
            self._log_info(f"signal {signal.Signals(stop.signum).name} arrived during the final save; run {ended}")
        self._log_info(f"run ended at step {self.state.step}: {ended}")
        self._log_mix()
        return {
            "state": asdict(self.state),
            "metrics": self.last_metrics,
            "losses": self.loss_history,
            "ended": ended,
            "signal": stopped_by,
        }

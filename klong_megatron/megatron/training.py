"""The trainable Megatron model: GPT + DDP + Megatron optimizer + warmup/cosine LR (SFT and RL share it).

``build_training_model`` -> (DDP-wrapped model, optimizer, scheduler). The model config gets
``calculate_per_token_loss=True`` and ``finalize_model_grads``: loss functions return SUMS with token
counts and Megatron divides the gradients by the global count (see ``megatron/step.py``).

Overlapped communication (on GPUs by default): the DP gradient reduce runs bucket by bucket during the backward
(``overlap_grad_reduce``) and, with the distributed optimizer, the all-gather of the updated parameters during the
next forward (``overlap_param_gather``, megatron-core DDP forward pre-hooks). Until that forward the model's
parameters are the previous step's: :func:`gather_params` completes the gather before anything reads them
directly (checkpoint saves, HF export, weight pushes).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig, TrainerConfig
from klong_megatron.megatron.model import build_gpt, init_layout_independent


def resolve_bf16(t: TrainerConfig) -> bool:
    """``trainer.bf16``, where None means bf16 on a GPU and fp32 on CPU."""
    return t.bf16 if t.bf16 is not None else torch.cuda.is_available()


def gather_params(model: torch.nn.Module) -> None:
    """Finish the deferred all-gather of updated parameters (``overlap_param_gather``) so that ``model``'s
    parameters are the current ones; a no-op otherwise. Collective over the data-parallel group."""
    if getattr(model, "use_forward_hook", False):  # megatron-core DDP with overlap_param_gather
        model.disable_forward_pre_hook(param_sync=True)
        model.enable_forward_pre_hook()


def ddp_config(parallel: ParallelConfig, *, on_gpu: bool) -> DistributedDataParallelConfig:
    """Megatron DDP settings of ``parallel``: fp32 gradient reduce; the overlaps resolved (None: on a GPU)."""
    overlap = on_gpu if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
    dist_opt, gather = parallel.use_distributed_optimizer, parallel.overlap_param_gather
    gather = dist_opt and on_gpu if gather is None else gather
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt, overlap_grad_reduce=overlap,
        overlap_param_gather=gather,
    )  # fmt: skip


def build_training_model(model_cfg: ModelConfig, t: TrainerConfig, *, init_from_hf: str | None = None):
    """(model, optimizer, scheduler) for ``t``; Megatron parallel state must be initialised.

    Weights: layout-independent init (same model at any TP/PP) when configured, then ``init_from_hf``.
    LR: linear warmup over ``t.warmup_steps``, cosine to ``t.min_lr`` over ``t.lr_decay_steps``
    (default ``t.train_steps - t.warmup_steps``).
    """
    bf16 = resolve_bf16(t)
    model = build_gpt(model_cfg, parallel=t.parallel, bf16=bf16)
    config = model.config
    if t.layout_independent_init:
        init_layout_independent(model, model_cfg, t.seed)
    if init_from_hf:
        from klong_megatron.megatron.hf import load_hf_weights

        load_hf_weights(model, init_from_hf, model_cfg)
    if bf16:
        model = Float16Module(config, model)
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp_cfg = ddp_config(t.parallel, on_gpu=torch.cuda.is_available())
    model = DistributedDataParallel(config, ddp_cfg, model)
    if ddp_cfg.overlap_grad_reduce:  # as Megatron-LM's training loop: reduce after the last micro-batch, by bucket
        config.no_sync_func = model.no_sync
        config.grad_sync_func = model.start_grad_sync
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=t.parallel.use_distributed_optimizer,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    decay = t.lr_decay_steps or max(1, t.train_steps - t.warmup_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.warmup_steps + decay, lr_decay_style="cosine", start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.train_steps, wd_incr_style="constant",
    )  # fmt: skip
    return model, optimizer, scheduler

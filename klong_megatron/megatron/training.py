"""The trainable Megatron model: GPT + DDP + Megatron optimizer + warmup/cosine LR (SFT and RL share it).

``build_training_model`` -> (DDP-wrapped model, optimizer, scheduler). The model config gets
``calculate_per_token_loss=True`` and ``finalize_model_grads``: loss functions return SUMS with token
counts and Megatron divides the gradients by the global count (see ``megatron/step.py``).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import TrainerConfig
from klong_megatron.megatron.model import build_gpt, init_layout_independent


def resolve_bf16(t: TrainerConfig) -> bool:
    """``trainer.bf16``, where None means bf16 on a GPU and fp32 on CPU."""
    return t.bf16 if t.bf16 is not None else torch.cuda.is_available()


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
    overlap = t.parallel.overlap_grad_reduce
    overlap = torch.cuda.is_available() if overlap is None else overlap
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=t.parallel.use_distributed_optimizer,
        overlap_grad_reduce=overlap,
    )  # fmt: skip
    model = DistributedDataParallel(config, ddp_cfg, model)
    if overlap:  # as Megatron-LM's training loop: reduce only after the last micro-batch, bucket by bucket
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

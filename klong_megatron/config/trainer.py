"""Schemas of the SFT training loop (``trainer=`` group): parallelism, optimizer, schedule, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from klong_megatron.config.model import ModelConfig


@dataclass
class ParallelConfig:
    """Megatron model parallelism; data parallelism is world_size / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size (num_layers must divide evenly)."""
    cp: int = 1
    """Context-parallel size (GPU with Transformer Engine only)."""
    ep: int = 1
    """Expert-parallel size for MoE models: routed experts split over ep data-parallel ranks."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in TP regions (GPU only; needs tp > 1)."""
    use_distributed_optimizer: bool = False
    """Shard Adam state across data-parallel ranks (ZeRO-1)."""
    recompute_granularity: str | None = None
    """Activation recomputation: null, "selective" or "full" (one layer at a time)."""
    overlap_grad_reduce: bool | None = None
    """Overlap the data-parallel gradient reduce with the backward pass (Megatron DDP buckets); None: on a GPU."""
    overlap_param_gather: bool | None = None
    """Distributed optimizer: all-gather the updated parameters bucket by bucket during the next forward instead
    of after the optimizer step; None: on a GPU when use_distributed_optimizer."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather needs parallel.use_distributed_optimizer=true")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(
                f"parallel.recompute_granularity must be null, selective or full, got {self.recompute_granularity!r}"
            )

    def check_model(self, model: ModelConfig) -> None:
        """Model x layout checks that megatron-core would only raise at the first forward (or not at all)."""
        if model.is_moe and self.tp > 1 and not self.sequence_parallel:
            raise ValueError(
                f"an MoE model with trainer.parallel.tp={self.tp} needs trainer.parallel.sequence_parallel=true "
                "(megatron-core's MoELayer refuses to train with tensor parallelism and no sequence parallelism)"
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        """DP of ``world_size`` processes; ValueError naming the sizes when tp*pp*cp or ep does not fit."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not a multiple of trainer.parallel tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp}"
            )
        if (world_size // (self.tp * self.pp)) % self.ep:
            raise ValueError(
                f"trainer.parallel.ep={self.ep} must divide world size / (tp*pp) = {world_size // (self.tp * self.pp)}"
            )
        return world_size // self.model_parallel_size


@dataclass
class TrainerConfig:
    """One SFT run: steps, batch sizes, AdamW with warmup + cosine decay, eval and checkpoints."""

    train_steps: int = MISSING
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    micro_batch_size: int = 1
    """Packed sequences per forward pass on one data-parallel rank."""
    global_batch_size: int = MISSING
    """Packed sequences per optimizer step over all data-parallel ranks (a multiple of micro x DP)."""
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_steps: int | None = None
    """Cosine decay length after warmup; None means train_steps."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    bf16: bool | None = None
    """bf16 params and compute; None means on a GPU, off on CPU."""
    seed: int = 1234
    eval_every: int = 0
    """Held-out loss every this many steps (and at the end); 0 disables."""
    eval_batches: int | None = None
    """Global batches of the held-out split per evaluation; None means the whole split."""
    log_every: int = 1
    save_dir: str | None = None
    """Checkpoint directory (dist_checkpointing); None means <run dir>/checkpoints."""
    save_every: int = 0
    """Save every this many steps; 0 saves only at the end (and on SIGTERM / Ctrl-C)."""
    async_save: bool = False
    """Write checkpoints in a background process while training goes on (SFT; ``latest`` names a step only once
    every rank's writer finished; at most one save in flight)."""
    fully_parallel_save: bool = False
    """Spread the writing of replicated tensors over the DP x CP ranks instead of DP rank 0 writing them all."""
    resume: bool = True
    """Continue from the latest checkpoint in save_dir when one exists."""
    resume_from: str | None = None
    """Explicit checkpoint directory to resume from; a missing one is an error."""
    exit_after_steps: int | None = None
    """Stop this process after this many steps (with a checkpoint), as a preemption would."""
    packed_format: str = "auto"
    """Micro-batch layout: "auto" (a flat THD sequence [1, mbs*S] with Transformer Engine, [mbs, S] rows with
    a block mask without) or "thd" (always flat; without TE a [1,1,T,T] block mask: CPU tests of the GPU layout)."""
    layout_independent_init: bool = True
    """Initialise weights from their global names so every TP/PP layout starts from the same model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for name in ("train_steps", "micro_batch_size", "global_batch_size", "log_every"):
            value = getattr(self, name)
            if value is not MISSING and value < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {value}")
        if self.global_batch_size is not MISSING and self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"trainer.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"trainer.micro_batch_size ({self.micro_batch_size})"
            )
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"trainer.min_lr ({self.min_lr}) must be <= trainer.lr ({self.lr})")
        if self.packed_format not in ("auto", "thd"):
            raise ValueError(f"trainer.packed_format must be auto or thd, got {self.packed_format!r}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("trainer.adam_beta1 and trainer.adam_beta2 must be in [0, 1)")


def register(cs: ConfigStore) -> None:
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)

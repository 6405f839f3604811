"""Top-level schema of ``klong-sft`` (``hydra_configs/sft.yaml``): one run of trajectory-splitting SFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from klong_megatron.config.cluster import ClusterConfig
from klong_megatron.config.data import DataConfig
from klong_megatron.config.logger import LoggerConfig
from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import TrainerConfig


@dataclass
class SFTConfig:
    """Model + data + trainer + logger + cluster. ``dry_run`` validates and exits before training."""

    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    name: str = "sft"
    """Experiment name (W&B group default, output folder)."""
    output_dir: str | None = None
    """Checkpoints and logs; None means Hydra's run directory."""
    dry_run: bool = False
    """Compose and validate the config, build the data, print the plan; no model, no training."""
    init_from_hf: str | None = None
    """Local Hugging Face checkpoint directory to initialise the weights from (Llama/Qwen2/Qwen3)."""

    def __post_init__(self) -> None:
        if self.model is MISSING or self.trainer is MISSING:
            return
        seq = self.data.seq_len or self.data.policy.max_len
        if seq > self.model.seq_length:
            raise ValueError(
                f"data.seq_len / data.policy.max_len ({seq}) exceeds model.seq_length ({self.model.seq_length})"
            )
        self.model.check_context(seq, "data.seq_len" if self.data.seq_len else "data.policy.max_len")
        self.trainer.parallel.check_model(self.model)
        if self.model.num_layers % self.trainer.parallel.pp:
            raise ValueError(
                f"model.num_layers ({self.model.num_layers}) must be divisible by "
                f"trainer.parallel.pp ({self.trainer.parallel.pp})"
            )
        if self.model.num_attention_heads % self.trainer.parallel.tp:
            raise ValueError(
                f"model.num_attention_heads ({self.model.num_attention_heads}) must be divisible by "
                f"trainer.parallel.tp ({self.trainer.parallel.tp})"
            )


def register(cs: ConfigStore) -> None:
    cs.store(name="sft_schema", node=SFTConfig)

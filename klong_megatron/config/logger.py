"""Schema of metric logging (``logger=`` group): console always, Weights & Biases optionally."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class LoggerConfig:
    """Where step metrics go. W&B mode comes from here, else from WANDB_MODE, else "online"."""

    backend: str = "console"
    """"console" (rich table lines) or "wandb" (console + W&B run)."""
    project: str = "klong-megatron"
    entity: str | None = None
    mode: str | None = None
    """W&B mode: "online", "offline" or "disabled"; None reads WANDB_MODE."""
    dir: str | None = None
    """W&B directory; None means the run's output directory."""
    name: str | None = None
    """Run name; None means the Hydra job name + override string."""
    group: str | None = None
    """Run group; None means the experiment name (sweeps share it)."""
    tags: list[str] = field(default_factory=list)
    id: str | None = None
    """W&B run id; None keeps the id in ``<output_dir>/wandb_run_id`` so a resumed or requeued job (same
    output directory) continues the same run (``resume="allow"``) instead of starting a new one."""

    def __post_init__(self) -> None:
        if self.backend not in ("console", "wandb"):
            raise ValueError(f"logger.backend must be console or wandb, got {self.backend!r}")
        if self.mode is not None and self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {self.mode!r}")


def register(cs: ConfigStore) -> None:
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)

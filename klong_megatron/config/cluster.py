"""Schema of the hardware a run targets (``cluster=`` group): used for MFU and by the launchers."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class ClusterConfig:
    """Nodes and devices; ``peak_tflops`` is the per-device dense bf16 peak (datasheet) for MFU."""

    name: str = "local"
    nodes: int = 1
    devices_per_node: int = 1
    """GPUs per node (processes per node under torchrun); CPU runs use 1 or 2."""
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s used as the MFU denominator; None disables the MFU estimate."""
    partition: str | None = None
    account: str | None = None
    time_limit_min: int = 60
    require_gpus: bool = False
    """Refuse to start without CUDA (GPU presets): a job that lost its GPUs fails instead of training on CPU."""

    def __post_init__(self) -> None:
        for name in ("nodes", "devices_per_node", "time_limit_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"cluster.peak_tflops must be > 0 or null, got {self.peak_tflops}")


def register(cs: ConfigStore) -> None:
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)

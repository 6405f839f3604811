"""Schema of the reproduction step (``reproduce=``): run the submission's reproduce.sh in a fresh sandbox."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from klong_megatron.config.sandbox import SandboxConfig


@dataclass
class ReproduceConfig:
    """PaperBench's reproduction step: a clean copy of the submission (no venv/.venv) in a new sandbox,
    ``bash reproduce.sh`` there, its output saved as the real reproduce.log for the judge."""

    enabled: bool = True
    """False: grade the submission as the agent left it (PaperBench Code-Dev; execution leaves then see
    no log)."""
    timeout_s: float = 36_000.0
    """Wall-clock limit of reproduce.sh (PaperBench's default is 100 h; the paper's runs used 10 h)."""
    sandbox: SandboxConfig = field(default_factory=lambda: SandboxConfig(memory_mb=16_384, cpus=4.0))
    """Image (e.g. the paper-reproduction image of tools/images/), GPUs, network (allowlist + pip index)."""
    upload_timeout_s: float = 600.0
    """Limit of copying the submission in and unpacking it."""

    def __post_init__(self) -> None:
        for name in ("timeout_s", "upload_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"reproduce.{name} must be > 0, got {getattr(self, name)}")


def register(cs: ConfigStore) -> None:
    cs.store(group="reproduce", name="reproduce_schema", node=ReproduceConfig)

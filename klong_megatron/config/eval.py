"""Top-level schema of ``klong-eval`` (``hydra_configs/eval.yaml``): a model on a set of paper tasks.

``engine``: ``chat`` (any OpenAI-compatible endpoint with tools, ``chat.*``), ``sglang`` (token
engines at ``rollout.servers``) or ``dev`` (``klong-devserver`` processes started over the Hugging Face
model at ``model_dir``). Token engines use ``data.tokenizer`` (the model's chat template) and
``data.policy`` (the context policy the agent loop truncates with); ``rollout.sampling`` /
``rollout.tool_format`` as in klong-rl.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.data import DataConfig
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.rollout import RolloutConfig
from klong_megatron.config.sandbox import SandboxConfig

EVAL_ENGINES = ("chat", "sglang", "dev")


@dataclass
class EvalConfig:
    """What to evaluate, how often, how fast, and where the results go."""

    tasks: list[str] = MISSING
    """Task folders, or directories holding task folders (PaperBench format)."""
    engine: str = "chat"
    chat: ChatEngineConfig = field(default_factory=ChatEngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model_dir: str | None = None
    """engine=dev: a local Hugging Face model directory served by klong-devserver."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    samples: int = 1
    """Rollouts per task (N)."""
    concurrency: int = 4
    """Rollouts (each with its sandbox, reproduction and grading) at once."""
    time_limit_s: float = 3600.0
    """Wall-clock budget of one rollout (stated in the prompt)."""
    max_turns: int = 200
    max_attempts: int = 2
    """Tries per rollout when the infrastructure fails (sandbox, endpoint); then reported, not stored."""
    max_invalid_frac: float = 0.2
    """A sample whose judge could not grade more than this share of leaves is left out of the means."""
    output_dir: str | None = None
    """Results, transcripts, report; None: Hydra's run directory. Rerun with the same one to resume."""
    name: str = "eval"
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.tasks is not MISSING and not self.tasks:
            raise ValueError("tasks must list at least one task folder or directory")
        if self.engine not in EVAL_ENGINES:
            raise ValueError(f"engine must be one of {EVAL_ENGINES}, got {self.engine!r}")
        if self.engine == "dev" and not self.model_dir:
            raise ValueError("model_dir must be set when engine=dev")
        if self.engine == "sglang" and not self.rollout.servers:
            raise ValueError("rollout.servers must list at least one URL when engine=sglang")
        for name in ("samples", "concurrency", "max_turns", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if not 0.0 <= self.max_invalid_frac <= 1.0:
            raise ValueError(f"max_invalid_frac must be in [0, 1], got {self.max_invalid_frac}")


def register(cs: ConfigStore) -> None:
    cs.store(name="eval_schema", node=EvalConfig)

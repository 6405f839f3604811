"""Schema of Research-Factory's distillation stage (``factory/distil.py``): teacher, budgets, rejection sampling.

The teacher is any OpenAI-compatible chat endpoint with tools (``teacher.*``); every attempt runs through the
same agent loop, sandbox, tools, time budget and blacklist as a ``klong-eval`` sample, then the reproduction
step and the judge. Rejection sampling keeps attempts with ``score >= min_score`` and/or the ``best_k`` best of
each task, then drops near-duplicates (MinHash Jaccard of the assistant text >= ``dedupe_jaccard``).
Nested as ``distil`` in ``FactoryConfig`` (config/factory.py), which is what the ConfigStore holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.config.sandbox import SandboxConfig


@dataclass
class DistilConfig:
    """How many teacher attempts, how fast, and which of them become SFT data."""

    teacher: ChatEngineConfig = field(default_factory=ChatEngineConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    samples: int = 4
    """Teacher attempts per task (N)."""
    concurrency: int = 16
    """Attempts (each with its sandbox, reproduction and grading) at once."""
    time_limit_s: float = 7200.0
    """Wall-clock budget of one attempt (stated in the prompt, as for the student)."""
    max_turns: int = 500
    tool_timeout_s: float = 600.0
    max_attempts: int = 2
    """Tries of one attempt when the infrastructure fails (endpoint, sandbox, judge); then recorded as failed."""
    max_invalid_frac: float = 0.2
    """An attempt whose judge could not grade more than this share of leaves is never kept."""
    min_score: float | None = 0.5
    """Keep attempts scoring at least this (None: no threshold)."""
    best_k: int | None = None
    """Keep at most the k best attempts of each task (None: no limit)."""
    dedupe_jaccard: float = 0.8
    """Drop an attempt whose assistant text's estimated Jaccard similarity (MinHash of word shingles) to a better
    kept attempt is >= this; 1.0 drops only (near-)identical texts, a value above 1 turns dedupe off."""
    shingle_words: int = 5
    minhash_perm: int = 128
    tokenizer: str | None = None
    """The student's tokenizer (a directory or tokenizer.json): the datasheet then counts kept trajectories in its
    tokens (rendered with its chat template and the tools). None: only the teacher's reported usage."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "concurrency", "max_turns", "max_attempts", "shingle_words", "minhash_perm"):
            if getattr(self, name) < 1:
                raise ValueError(f"distil.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("time_limit_s", "tool_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"distil.{name} must be > 0, got {getattr(self, name)}")
        if self.best_k is not None and self.best_k < 1:
            raise ValueError(f"distil.best_k must be >= 1 or null, got {self.best_k}")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"distil.min_score must be in [0, 1] or null, got {self.min_score}")
        if self.min_score is None and self.best_k is None:
            raise ValueError("distil.min_score and distil.best_k are both null: nothing would be rejected")
        if not 0.0 < self.dedupe_jaccard:
            raise ValueError(f"distil.dedupe_jaccard must be > 0 (> 1 turns dedupe off), got {self.dedupe_jaccard}")
        if not 0.0 <= self.max_invalid_frac <= 1.0:
            raise ValueError(f"distil.max_invalid_frac must be in [0, 1], got {self.max_invalid_frac}")

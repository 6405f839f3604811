"""Schemas for the trajectory-splitting data pipeline (``data=`` group)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ContextPolicyConfig:
    """How an over-long trajectory becomes windows (SFT) and contexts (rollouts). Units: tokens."""

    max_len: int = MISSING
    """Budget of one window / one model context."""
    overlap: int = 0
    """Every window after the first shares at least min(overlap, room) tokens of context with the previous one
    (room: what it holds besides its new messages); the most recent messages, the oldest of them elided
    (head + tail) when whole ones do not fit. The observations that open a window do not count."""
    prefix_turns: int = 0
    """Extend the default pinned prefix (system + first user) by this many assistant turns."""
    max_prefix_tokens: int | None = None
    """Cap on the pinned prefix; None means max_len // 2."""
    pin_reading: bool = False
    """Pin the task AND the reading that starts the trajectory (KLong: the paper): every turn before the first
    call of a ``write_tools`` tool or a later user message joins the pinned prefix from the next window on,
    capped at max_prefix_tokens (a longer reading is kept as head + tail with a marker)."""
    write_tools: list[str] = field(default_factory=lambda: ["write_file", "edit_file", "submit"])
    """Tools whose first call ends the reading (pin_reading)."""
    keep_full_turns: int | None = None
    """Progressive truncation: in carried context, tool outputs older than the last k turns become head+tail
    excerpts of excerpt_tokens, halved for every further k turns of age."""
    excerpt_tokens: int = 64
    """Size of such an excerpt (head + marker + tail)."""
    carry_tokens: int | None = None
    """Carried context a new window fills (older turns at decreasing fidelity); None means just ``overlap``."""
    gen_reserve: int = 0
    """Room kept free for the next assistant turn (rollouts: max_new_tokens)."""
    train_overlap: bool = False
    """Train assistant tokens again in every window containing them (default: exactly once)."""

    def __post_init__(self) -> None:
        if self.max_len is MISSING:
            return
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        for name in ("overlap", "prefix_turns", "gen_reserve", "carry_tokens"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_prefix_tokens is not None and not 0 < self.max_prefix_tokens < self.max_len:
            raise ValueError(f"max_prefix_tokens must be in (0, max_len={self.max_len}), got {self.max_prefix_tokens}")
        if self.keep_full_turns is not None and self.keep_full_turns < 0:
            raise ValueError(f"keep_full_turns must be >= 0 or null, got {self.keep_full_turns}")
        if self.excerpt_tokens < 8:
            raise ValueError(f"excerpt_tokens must be >= 8, got {self.excerpt_tokens}")

    @property
    def prefix_cap(self) -> int:
        return self.max_prefix_tokens if self.max_prefix_tokens is not None else self.max_len // 2


def policy_differences(a: ContextPolicyConfig, b: ContextPolicyConfig) -> list[str]:
    """Fields where two context policies differ, as ``"name: a_value != b_value"`` (empty: the same policy)."""
    return [
        f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
        for f in fields(ContextPolicyConfig)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


@dataclass
class BlendSourceConfig:
    """One prepared dataset (``klong-data prepare`` output) in a blend: give ``weight`` or ``epochs``."""

    path: str = MISSING
    """Directory written by ``klong-data prepare``."""
    weight: float | None = None
    """Share of the blend's samples (weights are normalised over the sources)."""
    epochs: float | None = None
    """Passes over this source per blend cycle (may be fractional, e.g. 0.5 or 3)."""

    def __post_init__(self) -> None:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError(f"data.blend source {self.path!r}: set exactly one of weight or epochs")
        value = self.weight if self.weight is not None else self.epochs
        if value <= 0:
            raise ValueError(f"data.blend source {self.path!r}: weight/epochs must be > 0, got {value}")


@dataclass
class DataConfig:
    """Where trajectories come from and how they become packed training sequences."""

    train_files: list[str] = field(default_factory=list)
    """Trajectory JSONL files; empty means the bundled demo set."""
    valid_files: list[str] = field(default_factory=list)
    """Held-out trajectory files; empty means ``valid_fraction`` of the training trajectories."""
    valid_fraction: float = 0.1
    tokenizer: str = "byte"
    """A local Hugging Face tokenizer directory, or "byte" for the bundled byte-level tokenizer."""
    policy: ContextPolicyConfig = field(default_factory=lambda: ContextPolicyConfig(max_len=1024))
    seq_len: int | None = None
    """Packed sequence length; None means policy.max_len."""
    skip_invalid: bool = False
    seed: int = 1234
    prepared: str | None = None
    """A directory from ``klong-data prepare``: train memory-mapped from it instead of splitting in memory."""
    blend: list[BlendSourceConfig] = field(default_factory=list)
    """Several prepared directories mixed by weight or epochs (see ``klong_megatron/prepared/blend.py``)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.prepared and self.blend:
            raise ValueError("data.prepared and data.blend: set one (a one-source blend equals data.prepared)")
        if self.blend and len({s.weight is None for s in self.blend}) > 1:
            raise ValueError("data.blend: give every source a weight, or every source epochs, not a mix")
        if self.seq_len is not None and self.seq_len < self.policy.max_len:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= policy.max_len ({self.policy.max_len})")


def register(cs: ConfigStore) -> None:
    cs.store(group="data", name="data_schema", node=DataConfig)

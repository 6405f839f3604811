"""Schemas for rollouts (``rollout=`` group): engine, agent-loop limits, concurrency, dev server."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

ENGINES = ("dev", "sglang")
TOOL_FORMATS = ("hermes", "glm45")


@dataclass
class DevServerConfig:
    """The development engine (in-process or ``klong-devserver``): a PyTorch model on CPU/GPU."""

    model: str = "tiny"
    """"tiny" (random 2-layer Llama over the tokenizer's vocab) or a local Hugging Face model dir."""
    tokenizer: str = "byte"
    """"byte" (bundled) or a local tokenizer dir; used for text input and /v1/chat/completions."""
    host: str = "127.0.0.1"
    port: int = 30000
    """0 picks a free port (printed on start)."""
    device: str = "cpu"
    dtype: str = "float32"
    max_context: int = 4096
    """Context length of the "tiny" model."""
    seed: int = 0
    threads: int = 0
    """torch CPU threads of klong-devserver; 0: 1 for the tiny model, else torch's default."""

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_context < 16:
            raise ValueError(f"max_context must be >= 16, got {self.max_context}")


@dataclass
class SamplingConfig:
    """Sampling for policy rollouts (one assistant turn per request)."""

    max_new_tokens: int = 512
    """Max tokens per assistant turn."""
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RolloutConfig:
    """How rollouts are generated, bounded and stored."""

    engine: str = "dev"
    """"dev" (in-process development engine) or "sglang" (HTTP servers in ``servers``)."""
    servers: list[str] = field(default_factory=list)
    """Base URLs of SGLang (or klong-devserver) servers, e.g. http://node1:30000."""
    request_timeout_s: float = 600.0
    """Bound on one /generate call."""
    connect_timeout_s: float = 5.0
    max_inflight_per_server: int = 64
    max_attempts: int = 3
    """Servers tried per request before it fails (fail-over on connection errors/timeouts)."""
    server_cooldown_s: float = 10.0
    """A failed server gets no requests for this long."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tool_format: str = "hermes"
    """Tool-call syntax the model writes: "hermes" (Qwen/Hermes <tool_call> JSON) or "glm45"."""
    max_turns: int = 100
    timeout_s: float = 7200.0
    """Wall-clock budget of one rollout (the progressive-RL stage timeout)."""
    tool_timeout_s: float = 600.0
    """Bound on one tool call."""
    concurrency: int = 8
    """Rollouts run at once (each holds one sandbox)."""
    store: str = "rollouts/trajectories.jsonl"
    """Crash-safe JSONL store of finished trajectories (append + fsync; resumable)."""
    export_dir: str = "rollouts/workdirs"
    """Each rollout's sandbox work dir is exported here for the judge."""
    devserver: DevServerConfig = field(default_factory=DevServerConfig)
    weight_pause_mode: str = "abort"
    """How a weight update pauses generation (SGLang /pause_generation): abort (aborted turns are re-queued
    and regenerated), retract (KV cache recomputed after the update) or in_place (old KV cache kept; no flush)."""
    weight_timeout_s: float = 600.0
    """Bound on each weight-update call (begin/end, one bucket, a disk load); control calls keep 60 s."""
    weight_bucket_mb: int = 512
    """rl.weight_sync=distributed: tensors per /update_weights_from_distributed call (a larger tensor goes alone)."""
    server_tp: int = 1
    server_pp: int = 1
    server_dp: int = 1
    """Each rollout server's layout (SGLang ``--tp`` / ``--pp-size`` / ``--dp-size``; slurm/rl.sbatch: GPUS_PER_SERVER
    = tp). rl.weight_sync=distributed supports pp = dp = 1 only (config check; the servers' /server_info is
    checked again at the first push); disk updates take any layout."""
    weight_verify: str = "changed"
    """After a broadcast push: checksum (every tensor's /weights_checker checksum under its HF name: dev
    servers), changed (the engine checksum moved when the weights did: SGLang) or off."""

    def __post_init__(self) -> None:
        if self.weight_pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"weight_pause_mode must be abort, retract or in_place, got {self.weight_pause_mode!r}")
        if self.weight_verify not in ("checksum", "changed", "off"):
            raise ValueError(f"weight_verify must be checksum, changed or off, got {self.weight_verify!r}")
        for name in ("server_tp", "server_pp", "server_dp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.weight_bucket_mb < 1 or self.weight_timeout_s <= 0:
            raise ValueError(f"weight_bucket_mb must be >= 1 and weight_timeout_s > 0, got {self.weight_bucket_mb}, "
                             f"{self.weight_timeout_s}")  # fmt: skip
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "sglang" and not self.servers:
            raise ValueError("servers must list at least one URL when engine=sglang")
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {self.tool_format!r}")
        for name in ("request_timeout_s", "connect_timeout_s", "timeout_s", "tool_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_inflight_per_server", "max_attempts", "max_turns", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.server_cooldown_s < 0:
            raise ValueError(f"server_cooldown_s must be >= 0, got {self.server_cooldown_s}")


def register(cs: ConfigStore) -> None:
    cs.store(group="rollout", name="rollout_schema", node=RolloutConfig)

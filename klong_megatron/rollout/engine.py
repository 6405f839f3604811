"""The inference-engine contract: token ids in, token ids + log-probs out.

Dataflow: agent loop -> ``Engine.generate(context_ids, sampling)`` -> ``Generation`` whose
``output_ids`` / ``output_logprobs`` are stored in the trajectory verbatim (no re-tokenisation),
so the RL update sees exactly the tokens the policy sampled and their behaviour log-probs.

Implementations (each passes tests/integration/test_rollout_engine_contract.py):
- ``SGLangEngine`` (rollout/sglang.py): HTTP client for one or more SGLang servers (or dev servers).
- ``DevEngine`` (rollout/devserver.py): the same sampling code in-process, no HTTP.

Limits: one prompt per call (batching is the server's job); ``finish_reason`` is one of
``stop`` (a stop token was sampled; it is included in ``output_ids``), ``length`` (max_new_tokens
or the model's context was reached) or ``abort`` (``abort()`` was called while generating).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")
PAUSE_MODES = ("abort", "retract", "in_place")
"""SGLang's ``/pause_generation`` modes (``srt/managers/io_struct.py`` ``PauseGenerationReqInput``): abort
running requests, retract them (KV cache recomputed on continue) or stop them in place (old KV cache kept)."""


class EngineError(RuntimeError):
    """An engine could not serve a request (every server down, timeouts, a bad reply)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (SGLang's ``sampling_params`` subset we rely on)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def to_sglang(self) -> dict[str, Any]:
        """The ``sampling_params`` JSON object of SGLang's native ``/generate``."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop_token_ids": list(self.stop_token_ids),
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out

    @classmethod
    def from_sglang(cls, params: dict[str, Any]) -> SamplingParams:
        """Parse a ``sampling_params`` object; unknown keys are ignored, bad values raise ValueError."""
        seed = params.get("sampling_seed", params.get("seed"))
        return cls(
            max_new_tokens=int(params.get("max_new_tokens", 128)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            stop_token_ids=tuple(params.get("stop_token_ids") or ()),
            seed=None if seed is None else int(seed),
        )


@dataclass(frozen=True)
class Generation:
    """One completion. ``len(output_ids) == len(output_logprobs)``; log-probs are natural-log
    probabilities of each sampled token under the sampling distribution's model logits (before
    temperature/top-p, as SGLang reports them)."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int = 0
    weight_version: str = ""
    """Which weights produced it (the server's ``weight_version``); recorded per turn."""
    server: str = ""
    """Which server answered (empty for in-process engines)."""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.output_ids) != len(self.output_logprobs):
            raise ValueError(f"output_ids ({len(self.output_ids)}) and output_logprobs differ in length")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


@dataclass(frozen=True)
class WeightUpdate:
    """Where new policy weights come from.

    ``path``: a checkpoint directory every server can read (``/update_weights_from_disk``).
    ``distributed``: NCCL broadcast from the trainer: the servers join ``group_name`` once
    (``/init_weights_update_group``), then receive tensors named ``names`` with ``dtypes``/``shapes``
    (``/update_weights_from_distributed``) while the trainer broadcasts them.
    """

    version: str
    path: str | None = None
    names: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    group_name: str = "klong_weight_sync"
    master_address: str = ""
    master_port: int = 0
    world_size: int = 0
    backend: str = "nccl"

    def __post_init__(self) -> None:
        if (self.path is None) == (not self.names):
            raise ValueError("WeightUpdate needs exactly one of path= (disk) or names= (distributed)")
        if self.names and not (len(self.names) == len(self.dtypes) == len(self.shapes)):
            raise ValueError("WeightUpdate names, dtypes and shapes must have the same length")


@runtime_checkable
class Engine(Protocol):
    """Async so that hundreds of rollouts can wait on one event loop."""

    async def generate(self, input_ids: list[int], sampling: SamplingParams) -> Generation:
        """Continue ``input_ids`` (a full context, prompt tokens only). Raises EngineError when unservable."""
        ...

    async def abort(self) -> None:
        """Stop every in-flight request; their ``generate`` calls return with finish_reason ``abort``."""
        ...

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load new weights; later generations report ``update.version`` as their weight_version."""
        ...

    async def health(self) -> bool:
        """True when the engine can generate now."""
        ...

    async def close(self) -> None: ...

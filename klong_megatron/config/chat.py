"""Schema of a chat engine: one OpenAI-compatible ``/v1/chat/completions`` endpoint (rollout/chat.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ChatEngineConfig:
    """One OpenAI-compatible endpoint."""

    base_url: str = "http://127.0.0.1:8000"
    """Server root; requests go to ``{base_url}/v1/chat/completions``."""
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable with a bearer token (unset: no Authorization header)."""
    temperature: float | None = None
    max_tokens: int | None = None
    request_timeout_s: float = 600.0
    max_attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Merged into every request (e.g. reasoning_effort)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"engine.base_url must be an http(s) URL, got {self.base_url!r}")
        if self.max_attempts < 1:
            raise ValueError(f"engine.max_attempts must be >= 1, got {self.max_attempts}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"engine.request_timeout_s must be > 0, got {self.request_timeout_s}")

"""Schema of the rubric-tree judge (``judge=`` group): endpoints, graders, budgets, queue, rubric transforms."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from klong_megatron.config.sandbox import SandboxConfig


@dataclass
class JudgeConfig:
    """How submissions are graded. Leaves with a ``check`` go to the check grader, the others to the LLM."""

    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:30000"])
    """Base URLs of OpenAI-compatible servers (``/v1/chat/completions``), e.g. SGLang serving the judge."""
    model: str = "openai/gpt-oss-120b"
    """Model name sent in requests (the served model path or name)."""
    api_key_env: str = "JUDGE_API_KEY"
    """Environment variable holding a bearer token, if the endpoint needs one (unset: no auth header)."""
    use_llm: bool = True
    """Grade leaves without a ``check`` with the LLM; false: such leaves come back invalid."""
    use_checks: bool = True
    """Run ``check`` commands in a sandbox; false: those leaves go to the LLM too."""
    max_concurrency_per_endpoint: int = 32
    """Requests in flight per endpoint (eval requests get free slots before train requests)."""
    request_timeout_s: float = 600.0
    endpoint_cooldown_s: float = 10.0
    """An endpoint that failed (connection, timeout, 5xx) is skipped this long."""
    max_attempts: int = 4
    """Tries per leaf (transient errors and unparseable replies) before the leaf is marked invalid."""
    backoff_s: float = 1.0
    """First retry delay after a transient error; doubles per attempt, jittered."""
    backoff_max_s: float = 30.0
    temperature: float | None = None
    """Sampling temperature (None: the server's default)."""
    max_tokens: int | None = None
    """Completion token limit per request (None: the server's default)."""
    reasoning_effort: str | None = None
    """low / medium / high for reasoning models such as gpt-oss (None: not sent)."""
    tokenizer: str | None = None
    """The judge model's tokenizer.json (file or directory) for token budgets; None: ~4 characters a token."""
    file_token_budget: int = 50_000
    """Tokens of submission files per grading prompt (ranked by relevance when they do not all fit)."""
    paper_token_budget: int = 60_000
    log_token_budget: int = 8_000
    """Tokens of reproduce.log shown to execution/result leaves (head and tail)."""
    rank_files: bool = True
    """Ask the model which files matter when the submission exceeds the file budget."""
    check_timeout_s: float = 600.0
    """Time limit of one ``check`` command."""
    check_sandbox: SandboxConfig = field(default_factory=lambda: SandboxConfig(backend="bwrap"))
    """Where ``check`` commands run."""
    cache_path: str | None = None
    """SQLite file caching grades by (submission hash, leaf, grader); None: in memory."""
    state_dir: str | None = None
    """Directory persisting queued jobs (resumed on restart); None: the queue lives in memory."""
    max_concurrent_jobs: int = 8
    max_job_attempts: int = 3
    code_only: bool = False
    """Keep only Code Development leaves (PaperBench Code-Dev)."""
    max_depth: int | None = None
    """Collapse subtrees deeper than this into single leaves (fewer, broader judge calls)."""
    zero_weight_categories: list[str] = field(default_factory=list)
    """Fine-grained categories whose leaves get weight 0 (e.g. "Dataset and Model Acquisition")."""

    def __post_init__(self) -> None:
        if self.use_llm and not self.endpoints:
            raise ValueError("endpoints must list at least one URL when use_llm is true")
        for i, url in enumerate(self.endpoints):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints[{i}] must be an http(s) URL, got {url!r}")
        if not self.use_llm and not self.use_checks:
            raise ValueError("use_llm and use_checks cannot both be false")
        for name in ("max_concurrency_per_endpoint", "max_attempts", "max_concurrent_jobs", "max_job_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("file_token_budget", "paper_token_budget", "log_token_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_s must be >= 0 and <= backoff_max_s, got {self.backoff_s}/{self.backoff_max_s}")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0 or null, got {self.max_depth}")
        if self.reasoning_effort not in (None, "low", "medium", "high"):
            raise ValueError(f"reasoning_effort must be low, medium, high or null, got {self.reasoning_effort!r}")


def register(cs: ConfigStore) -> None:
    cs.store(group="judge", name="judge_schema", node=JudgeConfig)

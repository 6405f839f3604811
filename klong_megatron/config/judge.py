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
    max_attempts: int = 3
    """Grading calls per leaf while the reply has no clear score (each retry asks to restate it)."""
    retry_timeout_s: float = 3600.0
    """How long a call keeps being retried through transient failures (connection, timeout, 5xx, 429) before
    its leaf is invalid: minutes to hours, so that a judge server restart does not cost rewards."""
    backoff_s: float = 1.0
    """First retry delay after a transient error; doubles per retry up to backoff_max_s, jittered."""
    backoff_max_s: float = 120.0
    temperature: float | None = None
    """Sampling temperature (None: the server's default)."""
    max_tokens: int | None = None
    """Completion token limit per request (None: the server's default)."""
    reasoning_effort: str | None = None
    """low / medium / high for reasoning models such as gpt-oss (None: not sent)."""
    context_window: int | None = None
    """The judge model's context window in tokens. Set: budgets as PaperBench sizes them (files = window -
    paper - addendum - log - buffer_tokens - max_tokens - 2k; log <= window / 2), counted with ``tokenizer``
    (required then). None: the fixed *_token_budget values below."""
    tokenizer: str | None = None
    """The judge model's tokenizer: tokenizer.json, a directory holding it, or a Hub id already in the local
    Hugging Face cache. None: ~4 characters a token (only without context_window)."""
    buffer_tokens: int = 10_000
    """Tokens of the window kept free for the prompt texts around paper, log and files (PaperBench: 10k)."""
    file_token_budget: int = 50_000
    """Without context_window: tokens of submission files per grading prompt."""
    paper_token_budget: int = 60_000
    """Without context_window: tokens of the paper per prompt."""
    log_token_budget: int = 8_000
    """Without context_window: tokens of reproduce.log shown to execution/result leaves (head and tail)."""
    rank_files: bool = True
    """Ask the model which files matter for each leaf (paper, addenda, criterion, file tree), as PaperBench."""
    max_ranked_files: int = 10
    """Files shown per leaf, in the model's order (PaperBench: 10)."""
    max_prior_nodes: int | None = None
    """Preceding criteria shown per leaf (ancestors + preceding siblings); None: all, as PaperBench."""
    parse_mode: str = "strict"
    """strict: read the reply's "# Score" section, a structured parse call only when that fails;
    structured: always a second, schema-constrained parse call (PaperBench)."""
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
    """Keep only Code Development leaves and grade without reproduce.sh (PaperBench Code-Dev)."""
    max_depth: int | None = None
    """Grade every node at this depth (root = 1, as PaperBench's Judge.grade counts) as one leaf."""
    zero_weight_categories: list[str] = field(default_factory=list)
    """Fine-grained categories whose leaves get weight 0 ("Dataset and Model Acquisition" is PaperBench's
    resources_provided); applied after code_only, as PaperBench does."""

    def __post_init__(self) -> None:
        if self.use_llm and not self.endpoints:
            raise ValueError("endpoints must list at least one URL when use_llm is true")
        for i, url in enumerate(self.endpoints):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"endpoints[{i}] must be an http(s) URL, got {url!r}")
        if not self.use_llm and not self.use_checks:
            raise ValueError("use_llm and use_checks cannot both be false")
        for name in (
            "max_concurrency_per_endpoint",
            "max_attempts",
            "max_concurrent_jobs",
            "max_job_attempts",
            "max_ranked_files",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("file_token_budget", "paper_token_budget", "log_token_budget", "buffer_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"backoff_s must be >= 0 and <= backoff_max_s, got {self.backoff_s}/{self.backoff_max_s}")
        if self.max_depth is not None and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1 (the root is depth 1) or null, got {self.max_depth}")
        if self.retry_timeout_s < 0:
            raise ValueError(f"retry_timeout_s must be >= 0, got {self.retry_timeout_s}")
        if self.parse_mode not in ("strict", "structured"):
            raise ValueError(f"parse_mode must be 'strict' or 'structured', got {self.parse_mode!r}")
        if self.context_window is not None:
            if self.context_window <= self.buffer_tokens:
                raise ValueError(f"context_window must exceed buffer_tokens, got {self.context_window}")
            if self.use_llm and not self.tokenizer:
                raise ValueError(
                    f"tokenizer must be set when context_window is set (model {self.model!r}): budgets are "
                    "counted in the judge model's tokens; give its tokenizer.json, directory or cached Hub id"
                )
        if self.max_prior_nodes is not None and self.max_prior_nodes < 0:
            raise ValueError(f"max_prior_nodes must be >= 0 or null, got {self.max_prior_nodes}")
        if self.reasoning_effort not in (None, "low", "medium", "high"):
            raise ValueError(f"reasoning_effort must be low, medium, high or null, got {self.reasoning_effort!r}")


def register(cs: ConfigStore) -> None:
    cs.store(group="judge", name="judge_schema", node=JudgeConfig)

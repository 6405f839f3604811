"""Schema of ``klong-factory`` (``hydra_configs/factory.yaml``): papers -> task folders -> teacher SFT data.

One section per stage (``collect``, ``filter``, ``rubric``, ``blacklist``, ``distil``); ``llm`` is the
OpenAI-compatible endpoint of the LLM stages (filter judgement, rubric writer, addendum). ``stages`` picks
which stages this invocation runs; every stage skips the papers it already finished (factory/store.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from klong_megatron.config.chat import ChatEngineConfig
from klong_megatron.config.distil import DistilConfig
from klong_megatron.config.logger import LoggerConfig

FACTORY_STAGES = ("collect", "filter", "rubric", "blacklist", "tasks", "distil")


@dataclass
class CollectConfig:
    """Where papers come from and how they are converted to Markdown (factory/collect.py, convert.py)."""

    inputs: list[str] = field(default_factory=list)
    """Folders (searched recursively) or files: .pdf, arXiv source archives (.tar.gz/.tgz/.gz), .tex, .md."""
    arxiv_ids: list[str] = field(default_factory=list)
    """arXiv ids to download (needs the network; a failure is recorded, the run goes on)."""
    arxiv_query: str | None = None
    """An arXiv search query (e.g. ``cat:cs.LG AND abs:reinforcement``); its first ``arxiv_max_results``."""
    arxiv_max_results: int = 20
    arxiv_api_url: str = "https://export.arxiv.org/api/query"
    """arXiv's Atom query API (or a mirror speaking it)."""
    pdf_layout: bool = False
    """PDFs through PyMuPDF's layout model (better tables and reading order, ~5x slower on CPU)."""
    pandoc: str = "pandoc"
    """The pandoc executable for LaTeX sources (absent: a TeX-preserving fallback, with a warning)."""
    min_chars: int = 1000
    """A converted paper with less text is a failure (e.g. a scanned PDF)."""

    def __post_init__(self) -> None:
        if self.arxiv_max_results < 1:
            raise ValueError(f"collect.arxiv_max_results must be >= 1, got {self.arxiv_max_results}")
        if self.min_chars < 0:
            raise ValueError(f"collect.min_chars must be >= 0, got {self.min_chars}")


@dataclass
class FilterConfig:
    """Which papers become tasks (factory/filter.py)."""

    min_chars: int = 5000
    max_chars: int = 400_000
    min_sections: int = 3
    min_year: int | None = None
    exclude_words: list[str] = field(default_factory=lambda: ["survey", "a review of"])
    """A paper whose title or first 3000 characters contain one of these is rejected (case-insensitive)."""
    require_any: list[str] = field(default_factory=list)
    """If set, the paper must contain one of these words."""
    llm: bool = False
    """Also ask ``llm`` whether the paper is reproducible in ``budget`` (and code released)."""
    budget: str = "one machine with 1 GPU, 24 hours, internet access but no pretrained weights of the paper"
    require_code: bool = False
    """With ``llm``: keep only papers the LLM says release official code."""
    llm_paper_chars: int = 30_000
    llm_attempts: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"filter.min_chars/max_chars must satisfy 0 <= min <= max, got {self.min_chars}, "
                             f"{self.max_chars}")  # fmt: skip
        if self.llm_attempts < 1:
            raise ValueError(f"filter.llm_attempts must be >= 1, got {self.llm_attempts}")


@dataclass
class RubricGenConfig:
    """How the LLM writes a rubric (factory/rubric.py)."""

    contributions: list[int] = field(default_factory=lambda: [3, 6])
    """[min, max] top-level contributions."""
    requirements: list[int] = field(default_factory=lambda: [2, 5])
    """[min, max] requirements per contribution."""
    leaves: list[int] = field(default_factory=lambda: [2, 6])
    """[min, max] gradable leaves per requirement."""
    attempts: int = 3
    """Replies per LLM step (the first plus repairs after a schema error); then the paper's rubric fails."""
    paper_chars: int = 60_000
    """The paper is cut to this many characters in the prompts."""

    def __post_init__(self) -> None:
        for name in ("contributions", "requirements", "leaves"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"rubric.{name} must be [min, max] with 1 <= min <= max, got {lo_hi}")
        if self.attempts < 1:
            raise ValueError(f"rubric.attempts must be >= 1, got {self.attempts}")


@dataclass
class BlacklistConfig:
    """Official code of each paper, which the agent must not use (factory/blacklist.py)."""

    hosts: list[str] = field(default_factory=lambda: ["github.com", "gitlab.com", "bitbucket.org"])
    """Code hosts whose repository URLs in the paper are candidates."""
    search_url: str | None = None
    """Optional search API: GET ``search_url`` with ``q=<title>``, answering ``{"urls": [...]}`` or a list."""
    addendum: bool = False
    """Ask ``llm`` for an addendum.md of clarifications (ambiguities of the paper, allowed substitutes)."""

    def __post_init__(self) -> None:
        if self.search_url is not None and not self.search_url.startswith(("http://", "https://")):
            raise ValueError(f"blacklist.search_url must be an http(s) URL, got {self.search_url!r}")


@dataclass
class FactoryConfig:
    """A Research-Factory run: which stages, over which papers, how concurrently, and where."""

    stages: list[str] = field(default_factory=lambda: list(FACTORY_STAGES[:5]))
    """Stages to run now, any subset of collect, filter, rubric, blacklist, tasks, distil (run in that order)."""
    output_dir: str | None = None
    """The run's directory; None: Hydra's run directory. Rerun with the same one to resume."""
    concurrency: int = 8
    """Papers processed at once (conversions in threads, LLM requests in flight)."""
    llm: ChatEngineConfig = field(default_factory=ChatEngineConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    rubric: RubricGenConfig = field(default_factory=RubricGenConfig)
    blacklist: BlacklistConfig = field(default_factory=BlacklistConfig)
    distil: DistilConfig = field(default_factory=DistilConfig)
    reference_rubrics: str | None = None
    """A folder of real PaperBench rubrics (``*.json``): the report sets their statistics beside the generated."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    progress: bool = True
    """Progress bars on stderr."""
    name: str = "factory"

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in FACTORY_STAGES]
        if bad or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {list(FACTORY_STAGES)}, got {list(self.stages)}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


def register(cs: ConfigStore) -> None:
    cs.store(name="factory_schema", node=FactoryConfig)

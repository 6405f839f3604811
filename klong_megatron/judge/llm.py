"""LLM leaf grader: PaperBench's per-leaf grading against any OpenAI-compatible judge endpoint.

Dataflow per grading job (computed once, judge/evidence.py): reproduce.log reduced and cut, paper cut, token
budgets per category (from ``context_window`` with the judge model's tokenizer, or fixed budgets without one),
per-category candidate files and their trees, the Result Analysis "touched files" flag.
Per leaf: Result Analysis with no touched files -> 0 without a call. Otherwise: ranking call (paper, addenda,
criterion, file tree -> paths) -> the first 10 ranked files packed into the budget -> grading call (judge/
prompts.py; preceding criteria = ancestors + preceding siblings) -> strict parse of the "# Score" section, or a
structured parse call when that fails (always, with ``parse_mode="structured"``, as PaperBench does) ->
:class:`LeafGrade` with the files shown and the token usage of every call in ``meta``.

Retries: a transient failure (connection, timeout, 5xx, 429) is retried with jittered exponential backoff
(``backoff_s`` doubling up to ``backoff_max_s``) until ``retry_timeout_s`` has passed since the first failure
of that call; only then is the leaf invalid. A reply without a score is answered with a request to restate it,
up to ``max_attempts`` grading calls. A ranking call rejected by the server (4xx) falls back to README-first
order and says so in ``meta``. Invalid leaves are reported, never scored 0 (judge/judge.py leaves them out).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from klong_megatron.judge import evidence, prompts
from klong_megatron.judge.base import GradingTask, LeafGrade
from klong_megatron.judge.endpoints import ChatError, ChatPool, ChatReply, TransientChatError
from klong_megatron.judge.rubric import CATEGORIES, TaskNode
from klong_megatron.judge.submission import Submission, TokenCounter

PROMPT_HASH = hashlib.sha256((inspect.getsource(prompts) + inspect.getsource(evidence)).encode()).hexdigest()[:16]
"""Changes whenever a prompt text or an evidence rule changes: part of every cache key."""


class RetriesExhausted(ChatError):
    """Transient failures went on for longer than ``retry_timeout_s``."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Usage:
    """Token usage of one leaf's calls, as the server reported it."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, reply: ChatReply) -> None:
        self.calls += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens


@dataclass
class _Context:
    """What every leaf of one grading job shares."""

    paper: str
    addendum: str
    log: str | None
    script: str | None
    created_at: float | None
    files: dict[str, list[str]]
    trees: dict[str, str]
    budgets: dict[str, int]
    touched: bool
    script_tokens: int = 0
    blocks: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Each file's prompt block and its token count, filled as leaves ask for files."""


class LLMGrader:
    """Grades leaves with a judge model; ``name`` is ``llm:<model>``; see the module docstring for the flow."""

    def __init__(
        self,
        pool: ChatPool,
        *,
        counter: TokenCounter | None = None,
        context_window: int | None = None,
        buffer_tokens: int = 10_000,
        file_token_budget: int = 50_000,
        paper_token_budget: int = 60_000,
        log_token_budget: int = 8_000,
        rank_files: bool = True,
        max_ranked_files: int = evidence.MAX_FILES,
        max_prior_nodes: int | None = None,
        code_only: bool = False,
        parse_mode: str = "strict",
        max_attempts: int = 3,
        retry_timeout_s: float = 3600.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 120.0,
        request_params: dict[str, Any] | None = None,
    ) -> None:
        if parse_mode not in ("strict", "structured"):
            raise ValueError(f"parse_mode must be 'strict' or 'structured', got {parse_mode!r}")
        self.pool = pool
        self.name = f"llm:{pool.model}"
        self.counter = counter or TokenCounter()
        if context_window is not None and self.counter.approximate:
            raise ValueError(
                f"judge model {pool.model!r}: context_window={context_window} needs the model's tokenizer "
                "(judge.tokenizer: its tokenizer.json or directory); budgets are counted in its tokens"
            )
        self.context_window = context_window
        self.buffer_tokens = buffer_tokens
        self.file_token_budget = file_token_budget
        self.paper_token_budget = paper_token_budget
        self.log_token_budget = log_token_budget
        self.rank_files = rank_files
        self.max_ranked_files = max_ranked_files
        self.max_prior_nodes = max_prior_nodes
        self.code_only = code_only
        self.parse_mode = parse_mode
        self.max_attempts = max_attempts
        self.retry_timeout_s = retry_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.request_params = dict(request_params or {})
        self._contexts: OrderedDict[str, _Context] = OrderedDict()

    # ------------------------------------------------------------ public

    async def grade(self, task: GradingTask, leaves: Sequence[TaskNode]) -> list[LeafGrade]:
        ctx = self._context(task)
        jobs = [self._grade_leaf(task, ctx, leaf) for leaf in leaves]
        return list(await asyncio.gather(*jobs))

    def cache_key(self, task: GradingTask, leaf: TaskNode) -> str:
        """Everything besides the submission and the leaf that shapes this leaf's grade, hashed."""
        ctx = self._context(task)
        prior = [n.requirements for n in task.rubric.prior_nodes(leaf.id, self.max_prior_nodes)]
        settings = [
            PROMPT_HASH, self.pool.model, sorted(self.request_params.items()), self.parse_mode, self.context_window,
            self.buffer_tokens, self.file_token_budget, self.paper_token_budget, self.log_token_budget,
            self.counter.name, self.rank_files, self.max_ranked_files, self.code_only, _sha(task.paper),
            _sha(task.addendum), _sha(task.judge_addendum), ctx.created_at, _sha(json.dumps(prior)),
        ]  # fmt: skip
        return f"{self.name}#{_sha(json.dumps(settings, default=str))}"

    # ------------------------------------------------------------ per job

    def _context(self, task: GradingTask) -> _Context:
        sub = task.submission
        texts = (task.paper, task.addendum, task.judge_addendum)
        key = _sha(f"{sub.content_hash}|{sub.log_created_at()}|{'|'.join(map(_sha, texts))}")
        if key in self._contexts:
            self._contexts.move_to_end(key)
            return self._contexts[key]
        ctx = self._build_context(task, sub)
        self._contexts[key] = ctx
        while len(self._contexts) > 8:
            self._contexts.popitem(last=False)
        return ctx

    def _build_context(self, task: GradingTask, sub: Submission) -> _Context:
        c = self.counter
        addendum = prompts.joined_addendum(task.addendum, task.judge_addendum)
        script, log = sub.reproduce()
        log = evidence.reduce_log(log) if log is not None else None
        created_at = sub.log_created_at()
        if self.context_window is not None:
            reserve = self.buffer_tokens + int(self.request_params.get("max_tokens") or 0)
            plan = evidence.plan_budgets(
                c, window=self.context_window, reserve=reserve, paper=task.paper, addendum=addendum, log=log
            )
            paper, log, budgets = plan.paper, plan.log, plan.files
        else:
            paper = c.truncate(task.paper, self.paper_token_budget)
            log = evidence.head_tail(c, log, self.log_token_budget) if log is not None else None
            budgets = dict.fromkeys(CATEGORIES, self.file_token_budget)
        files = {cat: evidence.category_files(sub, cat, created_at) for cat in CATEGORIES}
        trees = {
            cat: evidence.fitted_tree(c, files[cat], budgets[cat] + evidence.FILE_MARGIN_TOKENS) for cat in CATEGORIES
        }
        touched = evidence.results_touched(sub, files["Result Analysis"], created_at)
        script_tokens = 0 if self.code_only or script is None else c.count(script)
        return _Context(paper, addendum, log, script, created_at, files, trees, budgets, touched, script_tokens)

    # ------------------------------------------------------------ per leaf

    async def _grade_leaf(self, task: GradingTask, ctx: _Context, leaf: TaskNode) -> LeafGrade:
        usage = Usage()
        meta: dict[str, Any] = {"files": [], "file_selection": "none"}
        cat = leaf.task_category or "Code Development"
        if cat == "Result Analysis" and not ctx.touched:
            why = "no reproduction log" if ctx.created_at is None else "no output file was created or modified by it"
            meta["usage"] = vars(usage)
            expl = f"reproduce.sh produced no results to analyse ({why}): every Result Analysis criterion scores 0."
            return LeafGrade(leaf.id, 0.0, expl, self.name, True, 0, meta=meta)
        attempt = 0
        try:
            files, meta["files"], meta["file_selection"] = await self._files(task, ctx, leaf, usage)
            base = prompts.grading_messages(
                leaf,
                task.rubric.prior_nodes(leaf.id, self.max_prior_nodes),
                paper=ctx.paper,
                addendum=ctx.addendum,
                files=files,
                reproduce_script=ctx.script,
                reproduce_log=ctx.log,
                code_only=self.code_only,
            )
            messages, error = base, ""
            for attempt in range(1, self.max_attempts + 1):
                reply = await self._call(messages, task.priority, usage)
                try:
                    score, explanation, meta["parse"] = await self._parse(reply.content, task.priority, usage)
                except prompts.ReplyParseError as e:
                    error, messages = str(e), prompts.repair_messages(base, reply.content)
                    continue
                meta["usage"] = vars(usage)
                return LeafGrade(leaf.id, float(score), explanation, self.name, True, attempt, meta=meta)
            msg = f"no score after {self.max_attempts} grading calls: {error}"
        except ChatError as e:
            msg = f"grading failed: {e}"
        meta["usage"] = vars(usage)
        return LeafGrade(leaf.id, None, msg, self.name, False, max(attempt, 1), meta=meta)

    async def _files(
        self, task: GradingTask, ctx: _Context, leaf: TaskNode, usage: Usage
    ) -> tuple[str, list[str], str]:
        """(packed file text, paths shown, how they were chosen) for ``leaf``."""
        cat = leaf.task_category or "Code Development"
        candidates = ctx.files[cat]
        if not candidates:
            return "", [], "none (no candidate files)"
        order = sorted(candidates, key=lambda f: (not f.lower().startswith("readme"), f.count("/"), f))
        selection = "default"
        if self.rank_files:
            ask = prompts.ranking_messages(
                leaf, paper=ctx.paper, addendum=ctx.addendum, tree=ctx.trees[cat], max_files=self.max_ranked_files
            )
            try:
                ranked = prompts.parse_ranking((await self._call(ask, task.priority, usage)).content, candidates)
            except RetriesExhausted:
                raise
            except ChatError as e:
                ranked, selection = [], f"default (ranking request rejected: {str(e)[:200]})"
            if ranked:
                order, selection = ranked, "ranked"
            elif selection == "default":
                selection = "default (ranking reply named no candidate file)"
        budget = ctx.budgets[cat] - ctx.script_tokens
        picked = order[: self.max_ranked_files]
        text, shown = evidence.pack_files(self.counter, task.submission, picked, budget, ctx.blocks)
        return text, shown, selection

    async def _parse(self, reply: str, priority: str, usage: Usage) -> tuple[int, str, str]:
        if self.parse_mode == "strict":
            try:
                return (*prompts.parse_grade(reply), "strict")
            except prompts.ReplyParseError:
                pass
        out = await self._call(prompts.parse_messages(reply), priority, usage, response_format=prompts.RESPONSE_FORMAT)
        score, summary = prompts.parse_structured(out.content)
        return score, f"{summary}\n\n{reply}".strip(), "structured"

    async def _call(self, messages: list[dict[str, str]], priority: str, usage: Usage, **extra: Any) -> ChatReply:
        """One completion, transient failures retried with backoff until ``retry_timeout_s`` has passed."""
        deadline, tries = None, 0
        while True:
            try:
                reply = await self.pool.complete(messages, priority=priority, **{**self.request_params, **extra})
            except TransientChatError as e:
                tries += 1
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.retry_timeout_s
                if now >= deadline:
                    msg = f"transient failures for {self.retry_timeout_s:g} s ({tries} tries): {e}"
                    raise RetriesExhausted(msg) from None
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
                await asyncio.sleep(min(delay, deadline - now))
                continue
            usage.add(reply)
            return reply

"""LLM leaf grader: one chat completion per rubric leaf against an OpenAI-compatible judge endpoint.

Dataflow per leaf: submission files -> (all of them if they fit ``file_token_budget``, else the files
the model ranks as relevant from the file tree, then the rest) cut to the budget -> grading prompt
(judge/prompts.py) -> :class:`ChatPool` -> :func:`parse_grade` -> :class:`LeafGrade`.

Robustness: transient endpoint failures are retried with exponential backoff (jittered, capped); an
unparseable reply is retried at once with a request to answer in the format; a leaf still without a
score after ``max_attempts`` comes back *invalid* with the last error, never as a silent 0. A failed
ranking call falls back to the default file order (README first, then by path) and says so in ``meta``.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from klong_megatron.judge.base import GradingTask, LeafGrade
from klong_megatron.judge.endpoints import ChatError, ChatPool, TransientChatError
from klong_megatron.judge.prompts import (
    ReplyParseError,
    execution_leaf,
    grading_messages,
    parse_grade,
    parse_ranking,
    ranking_messages,
    repair_messages,
)
from klong_megatron.judge.rubric import TaskNode
from klong_megatron.judge.submission import REPRODUCE_LOG, REPRODUCE_SCRIPT, Submission, TokenCounter


@dataclass
class _View:
    """A submission's readable text, token counts and tree, computed once per submission."""

    order: list[str]
    text: dict[str, str]
    tokens: dict[str, int]
    tree: str
    reproduce_script: str | None
    reproduce_log: str | None


class LLMGrader:
    """Grades leaves with a judge model; ``name`` is ``llm:<model>`` (part of the cache key)."""

    def __init__(
        self,
        pool: ChatPool,
        *,
        counter: TokenCounter | None = None,
        file_token_budget: int = 50_000,
        paper_token_budget: int = 60_000,
        log_token_budget: int = 8_000,
        max_file_bytes: int = 1_000_000,
        rank_files: bool = True,
        max_ranked_files: int = 20,
        max_attempts: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        request_params: dict[str, Any] | None = None,
    ) -> None:
        self.pool = pool
        self.name = f"llm:{pool.model}"
        self.counter = counter or TokenCounter()
        self.file_token_budget = file_token_budget
        self.paper_token_budget = paper_token_budget
        self.log_token_budget = log_token_budget
        self.max_file_bytes = max_file_bytes
        self.rank_files = rank_files
        self.max_ranked_files = max_ranked_files
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.request_params = dict(request_params or {})
        self._views: OrderedDict[str, _View] = OrderedDict()

    async def grade(self, task: GradingTask, leaves: Sequence[TaskNode]) -> list[LeafGrade]:
        view = self._view(task.submission)
        ancestors = {node.id: path for path, node in task.rubric.walk() if node.is_leaf}
        paper = self.counter.truncate(task.paper, self.paper_token_budget)
        jobs = [self._grade_leaf(task, view, paper, leaf, ancestors.get(leaf.id, ())) for leaf in leaves]
        return list(await asyncio.gather(*jobs))

    # ------------------------------------------------------------ files

    def _view(self, sub: Submission) -> _View:
        key = sub.content_hash
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        text = {f: sub.read(f, self.max_file_bytes) for f in sub.text_files()}
        order = sorted(text, key=lambda f: (not f.lower().startswith("readme"), f.count("/"), f))
        script, log = sub.reproduce()
        if log is not None:
            log = _head_tail(self.counter, log, self.log_token_budget)
        view = _View(order, text, {f: self.counter.count(t) for f, t in text.items()}, sub.tree(), script, log)
        self._views[key] = view
        while len(self._views) > 4:
            self._views.popitem(last=False)
        return view

    def _select(self, view: _View, order: Sequence[str]) -> list[tuple[str, str]]:
        """Whole files in ``order`` while they fit the budget; the first file is cut if it alone is too big."""
        budget, out = self.file_token_budget, []
        for path in order:
            n = view.tokens[path]
            if n <= budget:
                out.append((path, view.text[path]))
                budget -= n
            elif not out and budget > 0:
                out.append((path, self.counter.truncate(view.text[path], budget) + "\n[... file truncated]"))
                budget = 0
        return out

    async def _files_for(self, task: GradingTask, view: _View, leaf: TaskNode) -> tuple[list[tuple[str, str]], str]:
        skip = {REPRODUCE_SCRIPT, REPRODUCE_LOG} if execution_leaf(leaf) else {REPRODUCE_LOG}
        default = [f for f in view.order if f not in skip]
        if sum(view.tokens[f] for f in default) <= self.file_token_budget:
            return self._select(view, default), "all"
        if not self.rank_files:
            return self._select(view, default), "default"
        try:
            reply = await self.pool.chat(
                ranking_messages(leaf, view.tree, self.max_ranked_files), priority=task.priority, **self.request_params
            )
        except ChatError:
            return self._select(view, default), "default (ranking request failed)"
        ranked = [f for f in parse_ranking(reply, default) if f in view.text][: self.max_ranked_files]
        if not ranked:
            return self._select(view, default), "default (ranking reply had no known files)"
        return self._select(view, ranked + [f for f in default if f not in ranked]), "ranked"

    # ------------------------------------------------------------ grading

    async def _grade_leaf(
        self, task: GradingTask, view: _View, paper: str, leaf: TaskNode, ancestors: Sequence[TaskNode]
    ) -> LeafGrade:
        files, selection = await self._files_for(task, view, leaf)
        base = grading_messages(
            leaf,
            ancestors,
            paper=paper,
            addendum=task.addendum,
            files=files,
            reproduce_script=view.reproduce_script,
            reproduce_log=view.reproduce_log,
        )
        meta = {"files": [p for p, _ in files], "file_selection": selection}
        messages, error = base, ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                reply = await self.pool.chat(messages, priority=task.priority, **self.request_params)
            except TransientChatError as e:
                error = str(e)
                if attempt < self.max_attempts:
                    await asyncio.sleep(self._backoff(attempt))
                continue
            except ChatError as e:
                return LeafGrade(leaf.id, None, f"grading failed: {e}", self.name, False, attempt, meta=meta)
            try:
                s, explanation = parse_grade(reply)
            except ReplyParseError as e:
                error, messages = str(e), repair_messages(base, reply)
                continue
            return LeafGrade(leaf.id, float(s), explanation, self.name, True, attempt, meta=meta)
        msg = f"grading failed after {self.max_attempts} attempts: {error}"
        return LeafGrade(leaf.id, None, msg, self.name, False, self.max_attempts, meta=meta)

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _head_tail(counter: TokenCounter, text: str, budget: int) -> str:
    """``text`` if it fits ``budget`` tokens, else its first and last ~half with a marker between."""
    if counter.count(text) <= budget:
        return text
    half = budget // 2
    head, tail = counter.truncate(text, half), counter.tail(text, half)
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters of the log omitted ...]\n{tail}"

"""The evidence a leaf is graded on, built as PaperBench's judge builds it (no network, no model).

Source followed: openai/preparedness ``project/paperbench/paperbench/judge/simple.py`` (``_get_whitelisted_files``,
``_truncate_input``, ``_get_available_context``, ``_prepare_tree_structure``, ``_prepare_relevant_files``) and
``judge/utils.py`` (``reduce_log``, ``format_file``, 200 kB per file).

Dataflow: :class:`Submission` -> :func:`category_files` (per category: docs + code for Code Development and Code
Execution; docs + table/output files modified at or after the reproduction log's creation for Result Analysis)
-> :func:`file_tree` (the ranking prompt's view) -> the model ranks them -> :func:`pack_files` concatenates the
ranked files in order into the category's token budget (at most 10; the file that overflows is cut at a line).
``reproduce.log`` -> :func:`reduce_log` (runs of lines that differ only in numbers, times, hashes or progress
bars collapse to one line plus "(repeated N times)") -> :func:`plan_budgets`.

Budgets with a context window W (tokens of the judge model's own tokenizer): the log is cut to W/2 (head and
tail halves kept; PaperBench keeps the head only), then, if paper + log exceed W, the log and then the paper are
cut to leave 5k tokens; the files of a leaf get W - paper - addendum - (log for Code Execution / Result Analysis)
- reserve - 2k, where reserve is ``buffer_tokens`` (PaperBench: 10k) plus the completion limit when one is set
(SGLang refuses a prompt whose length plus max_tokens reaches the window). PaperBench does not count the
addendum; we do, so a long judge addendum cannot push a prompt over the window.

Limits: the Result Analysis "touched files" rule trusts file modification times, so the reproduction step must
keep them (klong_megatron/eval/reproduce.py does). Drain3's log templates (PaperBench) are approximated by masking
numbers: lines of one template that differ in words are not collapsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from klong_megatron.judge.submission import REPRODUCE_META, Submission, TokenCounter

DOCS = frozenset({".md", ".txt", ".rst"})
CODE = frozenset(
    {".py", ".R", ".Rmd", ".m", ".jl", ".c", ".h", ".cpp", ".hpp", ".cc", ".cxx", ".hxx", ".java", ".js", ".ts"}
    | {".scala", ".go", ".rs", ".sh", ".config", ".cfg", ".json", ".yaml", ".yml", ".toml", ".ini"}
)
TABLES = frozenset(
    {".csv", ".tsv", ".psv", ".json", ".jsonl", ".html", ".xml", ".yaml", ".yml", ".toml", ".arff", ".tex", ".svm"}
    | {".libsvm"}
)
SKIPPED_DIR_PARTS = ("venv", ".venv", ".env", "wandb", ".egg-info", ".git", ".github", "__pycache__", "node_modules")
"""A directory whose name contains one of these is skipped (PaperBench's ``blacklisted_base_dirs``)."""
MAX_FILES = 10
FILE_BYTES = 200_000
FILE_MARGIN_TOKENS = 2_000
LOG_CUT_MARGIN_TOKENS = 5_000


def _skipped(rel: str) -> bool:
    return any(s in part for part in PurePosixPath(rel).parts[:-1] for s in SKIPPED_DIR_PARTS)


def category_files(sub: Submission, category: str, created_at: float | None) -> list[str]:
    """Files a leaf of ``category`` may be shown (POSIX paths, submission order).

    Result Analysis: docs, plus table/output files modified at or after ``created_at`` (none when it is None).
    The harness's own ``reproduce.meta.json`` is never evidence.
    """
    out = []
    for rel in sub.files:
        suffix = PurePosixPath(rel).suffix
        if rel == REPRODUCE_META or _skipped(rel):
            continue
        if category == "Result Analysis":
            if suffix in DOCS or (suffix in TABLES and created_at is not None and sub.mtime(rel) >= created_at):
                out.append(rel)
        elif suffix in DOCS or suffix in CODE:
            out.append(rel)
    return out


def results_touched(sub: Submission, files: Sequence[str], created_at: float | None) -> bool:
    """False when no Result Analysis file was modified at or after the run's start: then every Result Analysis
    leaf scores 0 (PaperBench's ``reproduce_touched_files``); always False without a reproduction log."""
    return created_at is not None and any(sub.mtime(f) >= created_at for f in files)


def file_tree(paths: Sequence[str], max_depth: int | None = None) -> str:
    """An indented tree of ``paths`` (``├──``/``└──`` like PaperBench); directories deeper than ``max_depth``
    are not expanded."""
    tree: dict[str, dict] = {}
    for p in paths:
        node = tree
        parts = PurePosixPath(p).parts
        for part in parts[: max_depth + 1] if max_depth is not None else parts:
            node = node.setdefault(part, {})

    def render(node: dict[str, dict], prefix: str) -> list[str]:
        lines = []
        for i, (name, child) in enumerate(node.items()):
            last = i == len(node) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{name}")
            lines += render(child, prefix + ("    " if last else "│   "))
        return lines

    return "\n".join(render(tree, ""))


def fitted_tree(counter: TokenCounter, paths: Sequence[str], budget: int) -> str:
    """The full tree if it fits ``budget`` tokens, else the tree 4 levels deep, else that tree cut to the budget."""
    text = file_tree(paths)
    if counter.count(text) < budget:
        return text
    text = file_tree(paths, max_depth=4)
    return text if counter.count(text) < budget else counter.truncate(text, max(budget, 0))


def format_file(path: str, text: str) -> str:
    body = text if text.strip() else "(FILE IS EMPTY)"
    return f"<FILE:{path}>\n{body}\n</FILE:{path}>"


def pack_files(
    counter: TokenCounter,
    sub: Submission,
    ranked: Sequence[str],
    budget: int,
    memo: dict[str, tuple[str, int]] | None = None,
) -> tuple[str, list[str]]:
    """Concatenate the first :data:`MAX_FILES` of ``ranked`` (each read up to 200 kB) into ``budget`` tokens.

    Returns (text, paths shown). The file that would overflow the budget is cut (at a line end) and ends
    the list; files that cannot be read are skipped. ``memo`` keeps each file's block and token count
    between the leaves of one submission (tokenizing is the expensive part).
    """
    memo = {} if memo is None else memo
    parts: list[str] = []
    shown: list[str] = []
    used = 0
    for rel in ranked[:MAX_FILES]:
        if rel not in memo:
            try:
                block = format_file(rel, sub.read(rel, FILE_BYTES)) + "\n\n"
            except OSError:
                continue
            memo[rel] = (block, counter.count(block))
        block, n = memo[rel]
        if used + n > budget:
            cut = counter.truncate(block, budget - used).rsplit("\n", 1)[0]
            if cut.strip():
                parts.append(cut)
                shown.append(rel)
            break
        parts.append(block)
        shown.append(rel)
        used += n
    return "".join(parts).rstrip("\n"), shown


_MASKS = (
    (re.compile(r"\d{4}-\d{2}-\d{2}T[0-9:.]+Z"), "<TIMESTAMP>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), "<DATE>"),
    (re.compile(r"\b\d{2}:\d{2}:\d{2}\b"), "<TIME>"),
    (re.compile(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b"), "<IP>"),
    (re.compile(r"\b[0-9a-fA-F]{8,}\b"), "<HEX>"),
    (re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"), "<NUM>"),
)
_PROGRESS = re.compile(r"\d+%?\|[█=]+|[KMG]?B/s|\d+%\s*\||[▏▎▍▌▋▊▉]{2,}")


def _template(line: str) -> str:
    if _PROGRESS.search(line):
        return "<PROGRESS_BAR>"
    for pattern, mask in _MASKS:
        line = pattern.sub(mask, line)
    return line


def reduce_log(text: str) -> str:
    """Collapse runs of consecutive lines with the same template into the first line + "(repeated N times)"."""
    out: list[str] = []
    prev, run = None, 0
    for line in text.splitlines():
        t = _template(line)
        if t == prev:
            run += 1
            continue
        if run > 1:
            out.append(f"  (repeated {run} times)")
        out.append(line)
        prev, run = t, 1
    if run > 1:
        out.append(f"  (repeated {run} times)")
    return "\n".join(out)


@dataclass(frozen=True)
class Budgets:
    """Texts cut to fit and the token budget of the files per category."""

    paper: str
    log: str | None
    files: dict[str, int]
    paper_tokens: int
    log_tokens: int


def head_tail(counter: TokenCounter, text: str, budget: int) -> str:
    """``text`` if it fits ``budget`` tokens, else its first and last halves with a marker between."""
    if counter.count(text) <= budget:
        return text
    half = max(budget, 0) // 2
    head, tail = counter.truncate(text, half), counter.tail(text, half)
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters of the log omitted ...]\n{tail}"


def plan_budgets(
    counter: TokenCounter,
    *,
    window: int,
    reserve: int,
    paper: str,
    addendum: str,
    log: str | None,
) -> Budgets:
    """Cut paper and (already reduced) log to the window and size the files' budget per category."""
    log_tokens = counter.count(log) if log is not None else 0
    if log is not None and log_tokens > window // 2:
        log = head_tail(counter, log, window // 2)
        log_tokens = counter.count(log)
    paper_tokens = counter.count(paper)
    if log is not None and paper_tokens + log_tokens > window:
        log = head_tail(counter, log, window - paper_tokens - LOG_CUT_MARGIN_TOKENS)
        log_tokens = counter.count(log)
    if paper_tokens + log_tokens > window:
        paper = counter.truncate(paper, window - log_tokens - LOG_CUT_MARGIN_TOKENS)
        paper_tokens = counter.count(paper)
    base = window - paper_tokens - counter.count(addendum) - reserve - FILE_MARGIN_TOKENS
    files = {
        "Code Development": base,
        "Code Execution": base - log_tokens,
        "Result Analysis": base - log_tokens,
    }
    return Budgets(paper, log, {k: max(v, 0) for k, v in files.items()}, paper_tokens, log_tokens)

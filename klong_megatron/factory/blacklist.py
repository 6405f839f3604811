"""Stage 4, blacklist and addendum: the paper's official code (which the agent must not use) and clarifications.

Repository URLs on the configured code hosts are found in the paper's Markdown (a space that PDF conversion put
after a ``/`` is tolerated: ``https://github.com/ ajyl/dpo_toxic``). A URL counts as the paper's own code when the
300 characters before it say so ("our code", "code is available", "we release", ...); the other URLs (cited
third-party code) are kept in ``blacklist.json`` as candidates with that reason, not blacklisted. An optional
search API (``blacklist.search_url``: GET ``?q=<title>`` -> ``{"urls": [...]}`` or ``[...]``) adds URLs. Output:
``blacklist.txt`` (one URL per line, ``none`` when empty, as PaperBench writes it) and, with
``blacklist.addendum``, an LLM-written ``addendum.md``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

from klong_megatron.config.factory import BlacklistConfig
from klong_megatron.factory.llm import FactoryLLM, need

OWN_CODE = re.compile(
    r"our (?:code|implementation|models?|repository)|code (?:is|are|will be) (?:publicly |made )?(?:available|released)"
    r"|code can be found|code and (?:data|models)|we (?:release|open[- ]source|make .{0,40}available)"
    r"|implementation (?:is|will be) available|available at|project page",
    re.I,
)
ADDENDUM = """You write the addendum of a paper-reproduction task (PaperBench): short clarifications that \
remove ambiguities of the paper for an AI agent reproducing it from scratch: missing hyperparameters or \
details (say what to assume), allowed substitutes for unavailable datasets or models, and which parts are out \
of scope. Do not reveal the paper's code. Answer with one JSON object only: {"addendum": "Markdown text"}"""


def repo_urls(markdown: str, hosts: list[str]) -> list[tuple[str, int, int]]:
    """(normalized ``https://host/owner/repo`` URL, offset of its first mention, end of the repository URL
    mentioned just before it or 0), in order of appearance."""
    host = "|".join(re.escape(h) for h in hosts)
    pattern = re.compile(r"(?:https?://)?(?:www\.)?(" + host + r")/\s?([A-Za-z0-9_.-]+)/\s?([A-Za-z0-9_.-]+)", re.I)
    seen: dict[str, tuple[int, int]] = {}
    prev_end = 0
    for m in pattern.finditer(markdown):
        repo = re.sub(r"(\.git)?[.,;:]*$", "", m.group(3))
        if repo:
            seen.setdefault(f"https://{m.group(1).lower()}/{m.group(2)}/{repo}", (m.start(), prev_end))
        prev_end = m.end()
    return [(url, start, prev) for url, (start, prev) in seen.items()]


def official_urls(markdown: str, hosts: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(the paper's own repositories, the other candidates with the reason they were not taken). The phrase
    must stand in the 300 characters before the URL's first mention, after any earlier repository URL."""
    own, others = [], []
    for url, pos, prev_end in repo_urls(markdown, hosts):
        before = markdown[max(prev_end, pos - 300) : pos]
        if OWN_CODE.search(before):
            own.append(url)
        else:
            others.append({"url": url, "reason": "no 'our code'-like phrase before its first mention (cited code?)"})
    return own, others


def search_urls(search_url: str, title: str, timeout_s: float = 30.0) -> list[str]:
    """URLs the configured search API returns for the paper title (raises httpx.HTTPError / ValueError)."""
    r = httpx.get(search_url, params={"q": title}, timeout=timeout_s)
    r.raise_for_status()
    data = r.json()
    urls = data.get("urls") if isinstance(data, dict) else data
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        got = str(data)[:200]
        raise ValueError(f"blacklist.search_url {search_url}: expected {{'urls': [str]}} or [str], got {got}")
    return urls


def _check_addendum(data: Any) -> str:
    text = need(data, "addendum", str, "answer").strip()
    if not text:
        raise ValueError("answer.addendum must be non-empty Markdown")
    return text


async def blacklist_paper(
    markdown: str, title: str, cfg: BlacklistConfig, llm: FactoryLLM | None, paper_chars: int = 60_000
) -> dict[str, Any]:
    """``{"urls", "candidates", "searched", "addendum"}`` for one paper (``addendum`` None unless configured)."""
    urls, candidates = official_urls(markdown, cfg.hosts)
    searched: list[str] = []
    if cfg.search_url:
        searched = await asyncio.to_thread(search_urls, cfg.search_url, title)
        urls += [u for u in searched if u not in urls]
    addendum = None
    if cfg.addendum:
        assert llm is not None
        addendum = await llm.ask_json(ADDENDUM, f"Paper: {title}\n\n{markdown[:paper_chars]}", _check_addendum)
    return {"urls": urls, "candidates": candidates, "searched": searched, "addendum": addendum}

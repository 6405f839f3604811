"""Stage 2, filter: keep a paper or not, with the reasons, by rules and an optional LLM judgement.

Rules (config ``filter.*``): length bounds, a minimum number of section headings (a paper, not a fragment), a
minimum year, words that exclude a paper (e.g. "survey") and words of which one must appear. The LLM judgement
(``filter.llm=true``) reads the paper's start and answers ``{"reproducible": bool, "code_released": bool,
"reason": str}``: can the paper's core results be reproduced in the sandbox's budget (``budget`` text in the
prompt), and is official code released. A paper is kept when every rule passes and, with the LLM, it judged
the paper reproducible (and code released, with ``require_code``). Output: ``filter.json`` =
``{"keep", "reasons": [...], "llm": {...} | null}`` (the reasons of a kept paper say why each check passed).
"""

from __future__ import annotations

import re
from typing import Any

from klong_megatron.config.factory import FilterConfig
from klong_megatron.factory.llm import FactoryLLM, need

SYSTEM = """You screen research papers for a benchmark in which an AI agent must reproduce a paper's results \
from scratch inside a sandbox. Budget of one attempt: {budget}.
Answer with one JSON object only: {{"reproducible": true|false, "code_released": true|false, "reason": "one \
sentence"}}. "reproducible": the paper's core experiments can be re-implemented and run within that budget \
(no proprietary data, no cluster-scale training). "code_released": the paper links its official code."""


def rule_checks(md: str, meta: dict[str, Any], cfg: FilterConfig) -> list[tuple[bool, str]]:
    """(passed, reason) for each rule."""
    out = [(cfg.min_chars <= len(md) <= cfg.max_chars,
            f"length {len(md)} chars (allowed {cfg.min_chars}..{cfg.max_chars})")]  # fmt: skip
    sections = len(re.findall(r"^(?:#{1,3} \S|\\(?:sub)?section\*?\{)", md, re.M))  # Markdown or Mathpix-style
    out.append((sections >= cfg.min_sections, f"{sections} section headings (need >= {cfg.min_sections})"))
    year = meta.get("year")
    if cfg.min_year is not None:
        out.append((year is not None and year >= cfg.min_year, f"year {year} (need >= {cfg.min_year})"))
    low = md.casefold()
    head = (meta.get("title", "") + "\n" + md[:3000]).casefold()
    for word in cfg.exclude_words:
        found = word.casefold() in head
        out.append((not found, f"exclude word {word!r} {'in' if found else 'not in'} the title/abstract"))
    if cfg.require_any:
        hit = [w for w in cfg.require_any if w.casefold() in low]
        out.append((bool(hit), f"required words found: {hit}" if hit else f"none of {cfg.require_any} found"))
    return out


def _check_llm(data: Any) -> dict[str, Any]:
    for key in ("reproducible", "code_released"):
        need(data, key, bool, "answer")
    need(data, "reason", str, "answer")
    return {k: data[k] for k in ("reproducible", "code_released", "reason")}


async def filter_paper(md: str, meta: dict[str, Any], cfg: FilterConfig, llm: FactoryLLM | None) -> dict[str, Any]:
    """The decision ``{"keep", "reasons", "llm"}`` for one paper (the LLM is asked only if the rules pass)."""
    checks = rule_checks(md, meta, cfg)
    reasons = [("ok: " if ok else "rejected: ") + why for ok, why in checks]
    keep = all(ok for ok, _ in checks)
    verdict = None
    if keep and cfg.llm:
        assert llm is not None
        user = f"Title: {meta.get('title', '')}\n\n{md[: cfg.llm_paper_chars]}"
        verdict = await llm.ask_json(SYSTEM.format(budget=cfg.budget), user, _check_llm, cfg.llm_attempts)
        ok = verdict["reproducible"] and (verdict["code_released"] or not cfg.require_code)
        reasons.append(f"{'ok' if ok else 'rejected'}: LLM: reproducible={verdict['reproducible']}, "
                       f"code_released={verdict['code_released']}: {verdict['reason']}")  # fmt: skip
        keep = ok
    return {"keep": keep, "reasons": reasons, "llm": verdict}

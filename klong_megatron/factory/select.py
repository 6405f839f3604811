"""Rejection sampling of graded teacher attempts: threshold, near-duplicate removal, best k per task.

Dataflow::

    graded attempt records (``{"id", "messages", "meta": {task, reward, reward_excluded, blacklist_flagged}}``)
    -> ineligible: blacklist_flagged | reward_excluded (judge could not grade enough leaves) | no assistant turn
    -> below min_score
    -> per task, best score first (ties: id): near-duplicate of an attempt already kept
       (MinHash estimate of the Jaccard similarity of the word shingles of the assistant text: content,
       reasoning and tool-call arguments) >= dedupe_jaccard
    -> beyond best_k of its task
    -> kept

Every attempt gets one :class:`Decision` with the first reason that rejected it. Duplicates are removed
before ``best_k`` so that copies do not take the k slots. Pure: numpy only, no I/O.

Limits: MinHash is an estimate (standard error ~ sqrt(J(1-J)/perm)); dedupe compares attempts of the same
task only (O(n^2) in one task's attempts, n = samples).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

PRIME = (1 << 31) - 1
REASONS = ("kept", "blacklist", "judge_invalid", "empty", "below_threshold", "near_duplicate", "not_best_k")


@dataclass(frozen=True)
class Decision:
    id: str
    task: str
    score: float
    kept: bool
    reason: str
    """One of :data:`REASONS`."""
    duplicate_of: str | None = None
    similarity: float | None = None


def assistant_text(messages: Iterable[dict[str, Any]]) -> str:
    """What the teacher wrote: content, reasoning and tool-call arguments of the assistant messages."""
    parts: list[str] = []
    for m in messages:
        if m.get("role") != "assistant":
            continue
        parts.append(str(m.get("reasoning_content") or m.get("reasoning") or ""))
        parts.append(str(m.get("content") or ""))
        for c in m.get("tool_calls") or []:
            fn = c.get("function") or {}
            parts += [str(fn.get("name") or ""), str(fn.get("arguments") or "")]
    return "\n".join(p for p in parts if p)


def shingles(text: str, words: int) -> set[bytes]:
    """The set of ``words``-word shingles of ``text`` (lower-cased word tokens; a shorter text is one shingle)."""
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    if len(toks) <= words:
        return {" ".join(toks).encode()} if toks else set()
    return {" ".join(toks[i : i + words]).encode() for i in range(len(toks) - words + 1)}


class MinHasher:
    """``perm`` universal hash functions ``(a x + b) mod (2^31 - 1)`` over 31-bit shingle hashes."""

    def __init__(self, perm: int = 128, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, size=perm, dtype=np.int64)
        self.b = rng.integers(0, PRIME, size=perm, dtype=np.int64)

    def signature(self, items: set[bytes]) -> np.ndarray:
        """int64 array [perm]: the minimum of each hash function over ``items`` (all PRIME when empty)."""
        sig = np.full(self.a.shape, PRIME, dtype=np.int64)
        if not items:
            return sig
        x = np.fromiter(
            (int.from_bytes(hashlib.blake2b(s, digest_size=8).digest(), "little") % PRIME for s in items),
            dtype=np.int64,
            count=len(items),
        )
        for i in range(0, len(x), 4096):  # [chunk, perm] int64: a*x < 2^62, no overflow
            h = (np.outer(x[i : i + 4096], self.a) + self.b) % PRIME
            sig = np.minimum(sig, h.min(axis=0))
        return sig


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two MinHash signatures (share of equal components)."""
    return float(np.mean(a == b))


def _gate(meta: dict[str, Any], messages: list[dict[str, Any]], min_score: float | None) -> str | None:
    if meta.get("blacklist_flagged"):
        return "blacklist"
    if meta.get("reward_excluded"):
        return "judge_invalid"
    if not any(m.get("role") == "assistant" for m in messages):
        return "empty"
    if min_score is not None and float(meta.get("reward") or 0.0) < min_score:
        return "below_threshold"
    return None


def select(
    records: list[dict[str, Any]],
    *,
    min_score: float | None,
    best_k: int | None,
    dedupe_jaccard: float,
    shingle_words: int = 5,
    perm: int = 128,
    seed: int = 0,
) -> list[Decision]:
    """One decision per record, in the order of ``records``; see the module docstring for the rules."""
    hasher = MinHasher(perm, seed)
    decided: dict[str, Decision] = {}
    candidates: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        meta = r.get("meta") or {}
        task, score = str(meta.get("task") or meta.get("task_id") or ""), float(meta.get("reward") or 0.0)
        reason = _gate(meta, r.get("messages") or [], min_score)
        if reason:
            decided[r["id"]] = Decision(r["id"], task, score, False, reason)
        else:
            candidates.setdefault(task, []).append(r)
    for task, rs in candidates.items():
        rs.sort(key=lambda r: (-float(r["meta"].get("reward") or 0.0), str(r["id"])))
        kept: list[tuple[str, np.ndarray]] = []
        for r in rs:
            score = float(r["meta"].get("reward") or 0.0)
            sig = hasher.signature(shingles(assistant_text(r["messages"]), shingle_words))
            near = max(((similarity(sig, s), kid) for kid, s in kept), default=(0.0, None))
            if near[1] is not None and near[0] >= dedupe_jaccard:
                decided[r["id"]] = Decision(r["id"], task, score, False, "near_duplicate", near[1], round(near[0], 4))
            elif best_k is not None and len(kept) >= best_k:
                decided[r["id"]] = Decision(r["id"], task, score, False, "not_best_k")
            else:
                kept.append((r["id"], sig))
                decided[r["id"]] = Decision(r["id"], task, score, True, "kept")
    return [decided[r["id"]] for r in records]

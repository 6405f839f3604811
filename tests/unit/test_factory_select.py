"""Rejection sampling of teacher attempts (factory/select.py): gates, threshold, MinHash dedupe, best k."""

from __future__ import annotations

import random

import numpy as np

from klong_megatron.factory.select import MinHasher, assistant_text, select, shingles, similarity

WORDS = [f"w{i}" for i in range(400)]


def _text(rng: random.Random, n: int = 300) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rec(rid: str, task: str, score: float, text: str, **meta: object) -> dict:
    msgs = [
        {"role": "user", "content": "reproduce the paper"},
        {"role": "assistant", "content": text, "reasoning_content": "think",
         "tool_calls": [{"function": {"name": "bash", "arguments": '{"command": "ls"}'}}]},
    ]  # fmt: skip
    return {"id": rid, "messages": msgs, "meta": {"task": task, "reward": score, **meta}}


def test_minhash_estimates_jaccard_within_its_standard_error() -> None:
    rng = random.Random(0)
    a = set(rng.sample(range(10_000), 3000))
    b = set(list(a)[:2000]) | set(rng.sample(range(10_000, 20_000), 1000))
    exact = len(a & b) / len(a | b)  # 0.5
    h = MinHasher(perm=256, seed=1)
    est = similarity(h.signature({str(x).encode() for x in a}), h.signature({str(x).encode() for x in b}))
    assert abs(est - exact) < 4 * np.sqrt(exact * (1 - exact) / 256), (est, exact)
    assert similarity(h.signature({b"x", b"y"}), h.signature({b"y", b"x"})) == 1.0


def test_assistant_text_covers_content_reasoning_and_tool_arguments_only() -> None:
    rec = _rec("a", "t", 1.0, "hello")
    text = assistant_text(rec["messages"])
    assert "hello" in text and "think" in text and '"command": "ls"' in text and "reproduce" not in text
    assert shingles("a b c", 5) == {b"a b c"} and len(shingles("a b c d e f", 5)) == 2


def test_select_gates_threshold_dedupe_then_best_k_with_one_reason_each() -> None:
    rng = random.Random(3)
    base = _text(rng)
    near = base.replace(base.split()[10], "zzz", 1)  # one word changed: Jaccard ~0.97
    records = [
        _rec("t/0", "t", 0.9, base),
        _rec("t/1", "t", 0.8, near),  # near-duplicate of t/0 (the better one is kept)
        _rec("t/2", "t", 0.7, _text(rng)),
        _rec("t/3", "t", 0.6, _text(rng)),  # beyond best_k=2 (t/1 does not take a slot)
        _rec("t/4", "t", 0.2, _text(rng)),  # below the threshold
        _rec("t/5", "t", 1.0, _text(rng), blacklist_flagged=True),
        _rec("t/6", "t", 1.0, _text(rng), reward_excluded=True),
        {"id": "t/7", "messages": [{"role": "user", "content": "x"}], "meta": {"task": "t", "reward": 1.0}},
        _rec("u/0", "u", 0.5, base),  # same text, other task: not a duplicate
    ]
    got = {d.id: d for d in select(records, min_score=0.5, best_k=2, dedupe_jaccard=0.8)}
    assert [d.id for d in select(records, min_score=0.5, best_k=2, dedupe_jaccard=0.8)] == [r["id"] for r in records]
    reasons = {k: d.reason for k, d in got.items()}
    assert reasons == {
        "t/0": "kept", "t/1": "near_duplicate", "t/2": "kept", "t/3": "not_best_k", "t/4": "below_threshold",
        "t/5": "blacklist", "t/6": "judge_invalid", "t/7": "empty", "u/0": "kept",
    }  # fmt: skip
    assert got["t/1"].duplicate_of == "t/0" and got["t/1"].similarity > 0.9
    # dedupe off (> 1) and no k: everything above the threshold that passed the gates stays
    loose = {d.id: d.reason for d in select(records, min_score=0.5, best_k=None, dedupe_jaccard=1.01)}
    assert [k for k, r in loose.items() if r == "kept"] == ["t/0", "t/1", "t/2", "t/3", "u/0"]
    # best k alone (no threshold): the low scorer competes for the slots
    only_k = {d.id: d.reason for d in select(records, min_score=None, best_k=3, dedupe_jaccard=0.8)}
    assert only_k["t/3"] == "kept" and only_k["t/4"] == "not_best_k"

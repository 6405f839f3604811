"""What the viewer shows, as plain JSON: trajectories (with tokens, loss mask and windows), rollouts, grades.

Dataflow: Trajectory -> (rollout record: its exact token stream, ``rendered_from_record``; otherwise the
Renderer) -> ContextPolicy windows -> :func:`trajectory_payload` (messages, one token table, per-window
segments as runs of trajectory positions); judge result JSON + rubric -> :func:`grade_payload` (the tree
with each node's score and each leaf's grade). :mod:`klong_megatron.view.page` embeds the payload in one
HTML page.

Token strings are decoded once per distinct id (a 700-turn trajectory has ~10^5 tokens but ~10^4 distinct
ids). Window tokens are stored as runs ``[start, length]`` over trajectory positions (start -1: marker
tokens, carried as text), so a window costs a few numbers, not a copy of its tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from klong_megatron.data.context import ContextPolicy, Window
from klong_megatron.data.render import RenderedTrajectory, Renderer
from klong_megatron.data.split import split_trajectory
from klong_megatron.data.trajectory import Trajectory

FOLD_CHARS = 2000
"""Messages longer than this are folded in the page (head shown, the rest on demand)."""


def _decoder(renderer: Renderer) -> Any:
    cache: dict[int, str] = {}

    def piece(i: int) -> str:
        if i not in cache:
            cache[i] = renderer.tokenizer.decode([i], skip_special_tokens=False)
        return cache[i]

    return piece


def _runs(positions: np.ndarray) -> list[list[int]]:
    """Runs ``[start, length]`` of consecutive positions; ``[-1, n]`` for n marker tokens (position -1)."""
    out: list[list[int]] = []
    for p in positions.tolist():
        if out and ((p == -1 and out[-1][0] == -1) or (p != -1 and out[-1][0] != -1 and out[-1][0] + out[-1][1] == p)):
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def _window(w: Window, piece: Any) -> dict[str, Any]:
    runs = _runs(w.positions)
    markers, k = [], 0  # the text of each marker run, in order
    for start, n in runs:
        if start == -1:
            markers.append("".join(piece(int(t)) for t in w.input_ids[k : k + n]))
        k += n
    return {
        "index": w.window_index,
        "tokens": len(w),
        "trained": int(w.loss_mask.sum()),
        "prefix_len": w.prefix_len,
        "segments": [list(s) for s in w.segments],
        "runs": runs,
        "markers": markers,
        "trained_runs": _runs(np.where(w.loss_mask.astype(bool), w.positions, -1)) if w.loss_mask.any() else [],
        "elided": w.elided,
    }


def _message(traj: Trajectory, i: int, rt: RenderedTrajectory) -> dict[str, Any]:
    m = traj.messages[i]
    s, e = (int(x) for x in rt.spans[i])
    out: dict[str, Any] = {
        "role": m.role,
        "content": m.content or "",
        "span": [s, e],
        "trained": int(rt.assistant_mask[s:e].sum()),
        "pinned": bool(m.pinned),
    }
    if m.reasoning:
        out["reasoning"] = m.reasoning
    if m.tool_calls:
        out["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    if m.name:
        out["name"] = m.name
    return out


def _steps(traj: Trajectory, piece: Any) -> dict[int, dict[str, Any]]:
    """Per assistant message index: policy version, timings, finish reason, sampled tokens and log-probs."""
    out = {}
    for st in traj.meta.get("steps", []):
        ids = st.get("output_ids") or []
        lps = st.get("logprobs") or []
        out[int(st["message"])] = {
            "version": st.get("weight_version"),
            "t_s": st.get("t_s"),
            "gen_s": st.get("gen_s"),
            "finish_reason": st.get("finish_reason"),
            "window": st.get("window"),
            "context_len": st.get("context_len"),
            "tokens": [piece(int(t)) for t in ids],
            "logprobs": [round(float(x), 3) if x is not None else None for x in lps[: len(ids)]],
        }
    return out


SUMMARY_KEYS = ("reward", "finish_reason", "turns", "tokens", "duration_s", "gen_s", "tool_s", "timed_out",
                "judge_per_category", "judge_invalid", "task_id", "sample", "stage", "iteration")  # fmt: skip


def trajectory_payload(traj: Trajectory, renderer: Renderer, policy: ContextPolicy | None) -> dict[str, Any]:
    """The viewer's JSON for one trajectory or rollout record.

    Rollout records (``meta.message_ids`` + ``meta.steps`` from the agent loop) show their exact token
    stream; other trajectories are rendered with ``renderer``. ``policy`` (may be None) splits it into
    the windows the trainer would use. Returns ``{"id", "summary", "messages", "tok", "mask", "windows",
    "steps"}`` where ``tok[k]`` is the text of token k of the full stream and ``mask`` holds runs of
    trained positions ``[start, length]``.
    """
    from klong_megatron.rollout.agent import rendered_from_record

    is_rollout = "message_ids" in traj.meta and "steps" in traj.meta
    rt = rendered_from_record(traj) if is_rollout else renderer.render(traj)
    piece = _decoder(renderer)
    windows = [_window(w, piece) for w in split_trajectory(rt, policy)] if policy is not None else []
    trained = np.where(rt.assistant_mask.astype(bool), np.arange(len(rt.input_ids)), -1)
    return {
        "id": traj.id,
        "kind": "rollout" if is_rollout else "trajectory",
        "summary": {k: traj.meta[k] for k in SUMMARY_KEYS if k in traj.meta},
        "messages": [_message(traj, i, rt) for i in range(len(traj.messages))],
        "tok": [piece(int(t)) for t in rt.input_ids],
        "mask": [r for r in _runs(trained) if r[0] != -1],
        "windows": windows,
        "steps": _steps(traj, piece) if is_rollout else {},
    }


def grade_payload(result: dict[str, Any], rubric: dict[str, Any] | None) -> dict[str, Any]:
    """The viewer's JSON for a judge result (``JudgeResult.to_dict()``, a ``*.grade.json``) and its rubric.

    Returns ``{"score", "per_category", "invalid", "tree"}``; ``tree`` nests ``{"id", "requirements",
    "weight", "category", "score", "grade"?, "children"}`` (``grade``: the leaf's score, validity and the
    judge's explanation). Without the rubric the tree is the flat list of graded leaves.
    """
    leaves = result.get("leaves", {})
    nodes = result.get("node_scores", {})

    def node(n: dict[str, Any]) -> dict[str, Any]:
        out = {
            "id": n.get("id", ""),
            "requirements": n.get("requirements", ""),
            "weight": n.get("weight", 1),
            "category": n.get("task_category"),
            "score": nodes.get(n.get("id", "")),
            "children": [node(c) for c in n.get("sub_tasks", [])],
        }
        if n.get("id") in leaves:
            out["grade"] = leaves[n["id"]]
            out["score"] = leaves[n["id"]].get("score", out["score"])
        return out

    if rubric is not None:
        tree = node(rubric)
    else:  # no rubric: the graded leaves under one root
        flat = [{"id": k, "requirements": "", "sub_tasks": []} for k in leaves]
        tree = node({"id": result.get("rubric_id", "rubric"), "requirements": "(rubric not given)", "sub_tasks": flat})
    return {
        "score": result.get("score"),
        "per_category": result.get("per_category", {}),
        "invalid": result.get("invalid", []),
        "tree": tree,
    }

"""Messages -> token ids, once per message, with the tokenizer's own chat template.

Dataflow: ``Trajectory`` -> chat template (Jinja, from the HF tokenizer) -> one string -> one
tokenization -> per-message token spans + assistant mask (``RenderedTrajectory``).

How message boundaries are found without knowing the template: message ``i`` ends where the rendering
of ``messages[:i+1]`` stops agreeing with the rendering of the whole conversation (longest common
prefix). This handles templates that group consecutive tool results into one turn (Qwen). A token
belongs to the message in which its first character lies, so the per-message slices always
concatenate to the tokenization of the whole conversation.

Assistant mask: 1 exactly on what the model generates after the generation prompt: reasoning,
content, tool-call text and the end-of-turn token; 0 on the header the template writes before it,
on anything after the end-of-turn token, and on system/user/tool messages.

Incremental rendering (the agent loop): ``render_new`` renders messages appended after a history and
``generation_prompt`` the header before the model's next turn; both agree with ``render`` for the
templates we target (tested on a Qwen-style template with tool calls).

Limits: templates that rewrite earlier turns once later ones exist (e.g. dropping old reasoning)
are rendered as the final conversation shows them; rendering is O(n^2) in the number of messages
(one template call per prefix), which is fine offline and is done once per trajectory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from klong_megatron.data.trajectory import Message, Trajectory

_LOCAL_CONTEXT = 3
"""Messages of history a template may look back at when rendering one message (verified, see _local_layout)."""

BYTE_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "byte_tokenizer"
BUNDLED_TOKENIZERS = {"byte": BYTE_TOKENIZER_DIR, "demo_bpe": BYTE_TOKENIZER_DIR.parent / "demo_bpe_tokenizer"}
"""``byte``: 256 bytes + ChatML (tools/make_byte_tokenizer.py); ``demo_bpe``: BPE learned on the demo task
family, ~3x fewer tokens, for the CPU RL demo (tools/make_demo_tokenizer.py)."""


@cache
def load_tokenizer(spec: str) -> Any:
    """A Hugging Face tokenizer from a local directory, or a bundled one by name (``BUNDLED_TOKENIZERS``)."""
    from transformers import AutoTokenizer

    path = BUNDLED_TOKENIZERS.get(spec, Path(spec))
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        names = " / ".join(repr(n) for n in BUNDLED_TOKENIZERS)
        raise ValueError(f"tokenizer: {spec!r} is neither {names} nor a local tokenizer directory")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tok.chat_template:
        raise ValueError(f"tokenizer: {spec!r} has no chat template")
    return tok


@dataclass
class RenderedTrajectory:
    """A trajectory as tokens. ``spans[i] = (start, end)`` are message ``i``'s tokens in ``input_ids``."""

    id: str
    input_ids: np.ndarray
    """int32 [N]"""
    assistant_mask: np.ndarray
    """uint8 [N]: 1 on generated (trainable) tokens"""
    spans: np.ndarray
    """int64 [M, 2], contiguous: spans[0, 0] == 0, spans[i, 1] == spans[i + 1, 0], spans[-1, 1] == N"""
    roles: list[str]
    pinned: list[bool]

    @property
    def num_messages(self) -> int:
        return len(self.roles)

    def message_ids(self, i: int) -> np.ndarray:
        return self.input_ids[self.spans[i, 0] : self.spans[i, 1]]

    def to_json(self) -> dict[str, Any]:
        return {
            "trajectory_id": self.id,
            "input_ids": self.input_ids.tolist(),
            "assistant_mask": self.assistant_mask.tolist(),
            "message_spans": self.spans.tolist(),
            "roles": self.roles,
        }


def _lcp(a: str, b: str) -> int:
    """Length of the longest common prefix (C-speed for the common all-equal case)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Renderer:
    """Renders messages with a tokenizer's chat template. Stateless apart from small caches."""

    def __init__(self, tokenizer: Any, *, eot_token: str | None = None):
        self.tokenizer = tokenizer
        eot = eot_token or tokenizer.eos_token
        if eot is None:
            raise ValueError("tokenizer has no eos_token; pass eot_token (the end-of-turn token)")
        self.eot_id = tokenizer.convert_tokens_to_ids(eot)
        self.vocab_size = len(tokenizer)

    # -- template and tokenizer calls -------------------------------------------------------------
    def text(self, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
        """The chat template's rendering of ``messages`` as a string."""
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            [m.to_openai() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Plain tokenization (special tokens in the text are recognised, none are added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
        return ids, starts

    # -- whole trajectories ---------------------------------------------------------------------
    def render(self, traj: Trajectory | list[Message], traj_id: str | None = None) -> RenderedTrajectory:
        """Render a whole conversation; see the module docstring for the contract."""
        messages = traj.messages if isinstance(traj, Trajectory) else traj
        tid = traj.id if isinstance(traj, Trajectory) else (traj_id or "")
        full = self.text(messages)
        layout = self._local_layout(messages, full) or self._exact_layout(messages, full)
        bounds, gen_starts = layout
        ids, starts = self._encode_offsets(full)
        spans = self._token_spans(starts, bounds, len(ids))
        mask = self._assistant_mask(ids, starts, spans, gen_starts)
        return RenderedTrajectory(
            id=tid,
            input_ids=ids,
            assistant_mask=mask,
            spans=spans,
            roles=[m.role for m in messages],
            pinned=[m.pinned for m in messages],
        )

    def _exact_layout(self, messages: list[Message], full: str) -> tuple[list[int], list[int | None]]:
        """Message end characters and generation starts from prefix renderings: O(n^2), always right."""
        bounds, gens, start = [], [], 0
        for i, m in enumerate(messages):
            end = len(full) if i == len(messages) - 1 else max(start, _lcp(self.text(messages[: i + 1]), full))
            gen = _lcp(self._prompt_text(messages[:i]), full) if m.role == "assistant" else None
            gens.append(None if gen is None else min(max(gen, start), end))
            bounds.append(end)
            start = end
        return bounds, gens

    def _local_layout(
        self, messages: list[Message], full: str, context: int = _LOCAL_CONTEXT
    ) -> tuple[list[int], list[int | None]] | None:
        """The same layout from renderings of each message among its first and ``context`` previous
        messages: O(n). Returns None (caller falls back to the exact layout) unless the local pieces
        concatenate exactly to ``full``."""
        pieces, gens, pos = [], [], 0
        for i, m in enumerate(messages):
            ctx = messages[:i] if i <= context + 1 else [messages[0], *messages[i - context : i]]
            local = self.text([*ctx, m, *messages[i + 1 : i + 2]])
            s = _lcp(self.text(ctx), local) if ctx else 0
            e = len(local) if i == len(messages) - 1 else max(s, _lcp(self.text([*ctx, m]), local))
            if m.role == "assistant":
                gens.append(pos + min(max(_lcp(self._prompt_text(ctx), local), s), e) - s)
            else:
                gens.append(None)
            pieces.append(local[s:e])
            pos += e - s
        if "".join(pieces) != full:
            return None
        return list(itertools.accumulate(len(p) for p in pieces)), gens

    def _prompt_text(self, history: list[Message]) -> str:
        """Rendering of ``history`` followed by the generation prompt."""
        if history:
            return self.text(history, add_generation_prompt=True)
        try:  # some templates cannot render an empty conversation
            return self.tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
        except Exception:
            return ""

    @staticmethod
    def _token_spans(starts: np.ndarray, ends: list[int], n: int) -> np.ndarray:
        """Token spans from message end characters: a token goes where its first character lies."""
        ends = np.asarray(ends[:-1], dtype=np.int64)
        cuts = np.searchsorted(starts, ends, side="left")
        edges = np.concatenate([[0], cuts, [n]])
        return np.stack([edges[:-1], edges[1:]], axis=1)

    def _assistant_mask(
        self, ids: np.ndarray, starts: np.ndarray, spans: np.ndarray, gen_starts: list[int | None]
    ) -> np.ndarray:
        mask = np.zeros(len(ids), dtype=np.uint8)
        for (s, e), g in zip(spans, gen_starts, strict=True):
            if g is None or s == e:
                continue
            first = s + int(np.searchsorted(starts[s:e], g, side="left"))
            eot = np.nonzero(ids[first:e] == self.eot_id)[0]
            last = first + int(eot[-1]) + 1 if len(eot) else e
            mask[first:last] = 1
        return mask

    # -- incremental (agent loop) -------------------------------------------------------------------
    def render_new(self, history: list[Message], new: list[Message]) -> list[np.ndarray]:
        """Token ids of each message in ``new`` as it renders after ``history`` (non-assistant messages).

        ``history`` must render to a stable prefix of ``history + new`` (true after an assistant turn
        with the templates we target); a ValueError says so otherwise.
        """
        base = self.text(history)
        full = self.text(history + new)
        if not full.startswith(base):
            raise ValueError("chat template re-renders history when messages are appended; cannot render incrementally")
        bounds, _ = self._local_layout(history + new, full) or self._exact_layout(history + new, full)
        ids, starts = self._encode_offsets(full[len(base) :])
        spans = self._token_spans(starts, [b - len(base) for b in bounds[len(history) :]], len(ids))
        return [ids[s:e] for s, e in spans]

    def generation_prompt(self, history: list[Message]) -> np.ndarray:
        """The header tokens the template writes before the model's next assistant turn."""
        base = self.text(history)
        prompt = self._prompt_text(history)
        if not prompt.startswith(base):
            raise ValueError("chat template's generation prompt does not extend the rendered history")
        return np.asarray(self.encode(prompt[len(base) :]), dtype=np.int32)

    def assistant_suffix(self) -> np.ndarray:
        """Tokens the template writes after an assistant's end-of-turn token (e.g. ChatML's newline)."""
        probe = [Message("system", "s"), Message("user", "u"), Message("assistant", "a")]
        rt = self.render(probe)
        ids = rt.message_ids(2)
        eot = np.nonzero(ids == self.eot_id)[0]
        return ids[int(eot[-1]) + 1 :] if len(eot) else ids[:0]

    def marker_ids(self, text: str) -> np.ndarray:
        """``text`` rendered as a user message (used for the truncated-history marker)."""
        return self.render_new([Message("system", "s")], [Message("user", text)])[0]

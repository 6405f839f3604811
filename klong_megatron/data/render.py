"""Messages -> one canonical token stream per trajectory, with the tokenizer's own chat template.

Dataflow: ``Trajectory`` (+ its ``tools``) -> per-piece chat-template renderings -> one text -> one
tokenization -> per-message token spans + assistant mask (``RenderedTrajectory``).

The canonical stream is what the agent loop feeds the model and samples, token-in/token-out, with
history never re-rendered. It is built from pieces, each rendered by the template:
- the prompt: the messages before the first assistant turn, with ``tools`` (the template puts the
  schemas in the system or first user turn);
- each assistant turn: the generation prompt (header, not trained) + the turn as the template renders it
  when it is the LAST message (what the model generates: ``<think>`` block, content, tool calls) up to and
  including its stop token (trained) + what the template writes after the stop token (e.g. ChatML's
  newline, not trained);
- each run of observations (tool / user / system messages) after an assistant turn: the text the template
  writes for them after an assistant turn (rendered after a fixed stand-in turn, so that earlier turns are
  never re-rendered).
For templates that do not rewrite history (Qwen2.5, Llama-3.1) the stream equals
``apply_chat_template(messages, tools=...)`` of the whole conversation (tested). For templates that do, the
stream keeps every turn as it was generated: Qwen3 keeps each turn's ``<think>`` block (empty when the turn
had no reasoning), GLM-4.5 keeps reasoning before a later user message. GLM-4.5 writes no end-of-turn token:
its model stops on the token that opens the next turn (``<|observation|>`` before tool results, ``<|user|>``
otherwise); that token is the end of the assistant's span and trained; a last turn with nothing after it gets
``eot_token`` (``<|user|>``) appended.

Stop tokens: the tokenizer's ``<|im_end|>`` ``<|eot_id|>`` ``<|eom_id|>`` ``<|user|>`` ``<|observation|>`` that
exist as added tokens, plus ``eos_token``. ``eot_id`` (appended to a turn cut off by ``max_new_tokens``) is the
first of them present.

Template refusals (Llama-3.1's single-tool-call rule, a role the template rejects) raise ``RenderError``:
one line naming ``file:line``, the trajectory id, the message index and the template's own message.

Limits: a token belongs to the message in which its first character lies; rendering calls the template
O(messages) times on short pieces (prompt + the last observations), done once per trajectory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from klong_megatron.data.trajectory import Message, ReadStats, ToolCall, Trajectory
from klong_megatron.errors import UserError

Tools = list[dict[str, Any]] | None

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
    tool_names: list[tuple[str, ...]] | None = None
    """names of the tools each message calls (assistant messages; the context policy's pin_reading)"""

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


_STOP_NAMES = ("<|im_end|>", "<|eot_id|>", "<|user|>", "<|eom_id|>", "<|observation|>")
ANCHOR = "KLONG-ANCHOR-7f3a"
"""Content of the stand-in assistant turn after which observations are rendered (never in the output)."""


class RenderError(UserError):
    """The chat template refused a trajectory; the message names where and the template's reason."""


class _Refusal(Exception):
    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index, self.reason = index, reason


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


@dataclass
class _Turn:
    """One assistant turn's text pieces: header (prompt), body (generated, ends with its stop if the
    template writes one), suffix (after the stop)."""

    header: str
    body: str
    suffix: str
    has_stop: bool


_PROBE = [
    Message("system", "You are an agent."),
    Message("user", "Task: go."),
    Message(
        "assistant", "Looking.", tool_calls=(ToolCall("bash", '{"command": "ls -1"}', "call_0"),), reasoning="Plan."
    ),
    Message("tool", "a.txt\nb.txt", tool_call_id="call_0", name="bash"),
]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "bash", "description": "Run a shell command.", "parameters": {
    "type": "object", "properties": {"command": {"type": "string", "description": "the command"}},
    "required": ["command"]}}}]  # fmt: skip


class _TemplateCall:
    """``tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)`` without
    re-walking the tool schemas on every call (transformers converts them to plain data each time: most of the
    agent's per-turn CPU). The same steps as transformers 5.x (tokenization_utils_base.py ``apply_chat_template``
    -> utils/chat_template_utils.py ``render_jinja_template``: the template chosen by ``get_chat_template``, None
    values dropped, reasoning aliased, the special tokens as template variables), with the schemas made plain
    once per list. Our messages are plain JSON types already (``Message.to_openai``). ``make`` returns
    None (callers use ``apply_chat_template``) when these functions are missing or a probe renders differently."""

    def __init__(self, tokenizer: Any, helpers: tuple[Any, Any, Any]) -> None:
        self.tokenizer = tokenizer
        self.compile, self.alias, self.plain = helpers
        self.kwargs = self.plain(dict(tokenizer.special_tokens_map))
        self.tools: dict[int, tuple[Any, Any]] = {}  # id of a schema list -> (the list, kept alive; its plain form)

    @classmethod
    def make(cls, tokenizer: Any) -> _TemplateCall | None:
        try:
            from transformers.utils.chat_template_utils import (
                _alias_reasoning_fields,
                _compile_jinja_template,
                _plain_template_data,
            )

            call = cls(tokenizer, (_compile_jinja_template, _alias_reasoning_fields, _plain_template_data))
            for k, tools in ((2, None), (4, None), (2, _PROBE_TOOLS), (4, _PROBE_TOOLS)):
                chat = [m.to_openai() for m in _PROBE[:k]]
                for gen in (False, True):
                    want = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)
                    if call(chat, tools, gen) != want:
                        return None
        except Exception:  # another transformers, or a template that refuses the probe: the plain path
            return None
        return call

    def __call__(self, chat: list[dict[str, Any]], tools: Tools, gen: bool) -> str:
        template = self.compile(self.tokenizer.get_chat_template(None, tools))
        plain = None
        if tools is not None:  # by identity: a schema list is never changed once made (ToolSet.schemas, a record)
            hit = self.tools.get(id(tools))
            if hit is None or hit[0] is not tools:
                if len(self.tools) >= 4096:
                    self.tools.clear()
                hit = self.tools[id(tools)] = (tools, self.plain(tools))
            plain = hit[1]
        messages = self.alias([{k: v for k, v in m.items() if v is not None} for m in chat])
        return template.render(messages=messages, tools=plain, documents=None, add_generation_prompt=gen,
                               **self.kwargs)  # fmt: skip


class Renderer:
    """Renders messages with a tokenizer's chat template (see the module docstring). Stateless apart from caches."""

    def __init__(self, tokenizer: Any, *, eot_token: str | None = None):
        self.tokenizer = tokenizer
        self._call = _TemplateCall.make(tokenizer)
        added = set(tokenizer.get_added_vocab())
        stops = [t for t in _STOP_NAMES if t in added]
        if tokenizer.eos_token is not None and tokenizer.eos_token not in stops:
            stops.append(tokenizer.eos_token)
        eot = eot_token or (stops[0] if stops else None)
        if eot is None:
            raise ValueError("tokenizer has no eos_token; pass eot_token (the end-of-turn token)")
        self.eot_text = eot
        self.eot_id = int(tokenizer.convert_tokens_to_ids(eot))
        self.stop_texts = tuple(dict.fromkeys([eot, *stops]))
        self.stop_ids = tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in self.stop_texts)
        self.vocab_size = len(tokenizer)
        anchor = Message("assistant", ANCHOR)
        turn = self._turn([Message("user", "Q")], anchor, None, 0)
        self._anchor_tail = turn.body[turn.body.index(ANCHOR) + len(ANCHOR) :] + turn.suffix
        self._suffix_text = turn.suffix
        self.writes_stop = turn.has_stop
        """False for templates (GLM-4.5) whose turn ends with the token that opens the next message."""

    # -- template and tokenizer calls -------------------------------------------------------------
    def text(self, messages: list[Message], *, add_generation_prompt: bool = False, tools: Tools = None) -> str:
        """The chat template's rendering of ``messages`` as a string (a refusal raises ``RenderError``)."""
        try:
            return self._t(messages, tools, add_generation_prompt)
        except _Refusal as e:
            raise RenderError(f"chat template refused the conversation: {e.reason}") from None

    def _t(self, messages: list[Message], tools: Tools, gen: bool = False, blame: int = -1) -> str:
        if not messages and not gen:
            return ""
        chat = [m.to_openai() for m in messages]
        try:
            if self._call is not None:
                return self._call(chat, tools, gen)
            return self.tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja's TemplateError (raise_exception), or its TypeError/KeyError on a field
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise _Refusal(blame if blame >= 0 else max(len(messages) - 1, 0), reason) from None

    def encode(self, text: str) -> list[int]:
        """Plain tokenization (special tokens in the text are recognised, none are added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
        return ids, starts

    def _first_stop(self, text: str) -> int:
        """End of the first stop token in ``text``, or -1."""
        hits = [(k, len(t)) for t in self.stop_texts if (k := text.find(t)) >= 0]
        return min(hits)[0] + min(hits)[1] if hits else -1

    def _leading_stop(self, text: str) -> str:
        return next((t for t in self.stop_texts if text.startswith(t)), "")

    # -- pieces ----------------------------------------------------------------------------------------
    def _turn(
        self, ctx: list[Message], m: Message, tools: Tools, index: int, pair: tuple[str, str] | None = None
    ) -> _Turn:
        """Assistant ``m`` rendered as the last message after ``ctx`` (which ends with a non-assistant);
        ``pair``: ``ctx``'s renderings without and with the generation prompt, when already made."""
        base, prompt = pair or (self._t(ctx, tools, blame=index), self._t(ctx, tools, True, blame=index))
        full = self._t([*ctx, m], tools, blame=index)
        if not (prompt.startswith(base) and full.startswith(prompt)):
            raise _Refusal(index, "the template's generation prompt does not extend the rendered history")
        out = full[len(prompt) :]
        k = self._first_stop(out)
        if k < 0:
            return _Turn(prompt[len(base) :], out, "", False)
        return _Turn(prompt[len(base) :], out[:k], out[k:], True)

    def _after(self, block: list[Message], index: int) -> str:
        """Text the template writes for non-assistant ``block`` right after an assistant turn (after that
        turn's stop token and suffix; a GLM-style opening stop token is kept)."""
        raw = self._t([Message("user", "Q"), Message("assistant", ANCHOR), *block], None, blame=index)
        k = raw.rfind(ANCHOR) + len(ANCHOR)
        if not raw.startswith(self._anchor_tail, k):
            raise _Refusal(index, "the template ends an assistant turn differently when messages follow it")
        return raw[k + len(self._anchor_tail) :]

    def _bounds(self, texts: list[str], full: str, start: int) -> list[int]:
        """End characters of each message from renderings of growing prefixes (the last ends at ``full``)."""
        out = [start + max(0, _lcp(t, full)) for t in texts]
        return [*(max(a, b) for a, b in zip(out, [start, *out], strict=False)), start + len(full)]

    def _prompt_layout(self, init: list[Message], tools: Tools) -> tuple[str, list[int]]:
        full = self._t(init, tools)
        texts = []
        for k in range(1, len(init)):
            try:
                texts.append(self._t(init[:k], tools))
            except _Refusal:  # e.g. Llama-3.1 puts tools in the first user message: not yet there
                try:
                    texts.append(self._t(init[:k], None))
                except _Refusal:
                    texts.append("")
        return full, self._bounds(texts, full, 0)

    def _block_layout(self, block: list[Message], index: int, strip_stop: bool) -> tuple[str, str, list[int]]:
        """-> (leading stop token moved to the previous turn, the block's text, message end characters)."""
        full = self._after(block, index)
        stop = self._leading_stop(full) if strip_stop else ""
        texts = [self._after(block[:k], index)[len(stop) :] for k in range(1, len(block))]
        return stop, full[len(stop) :], self._bounds(texts, full[len(stop) :], 0)

    # -- whole trajectories ---------------------------------------------------------------------
    def render(
        self, traj: Trajectory | list[Message], traj_id: str | None = None, tools: Tools = None
    ) -> RenderedTrajectory:
        """Render a whole conversation to the canonical stream (module docstring). ``RenderError`` on refusal."""
        messages = traj.messages if isinstance(traj, Trajectory) else traj
        tid = traj.id if isinstance(traj, Trajectory) else (traj_id or "")
        tools = traj.tools if isinstance(traj, Trajectory) and tools is None else tools
        try:
            text, bounds, gens = self._layout(messages, tools)
        except _Refusal as e:
            where = f"{traj.source}: " if isinstance(traj, Trajectory) and traj.source else ""
            role = messages[e.index].role if e.index < len(messages) else "?"
            raise RenderError(
                f"{where}trajectory {tid!r}: message {e.index} ({role}): chat template refused: {e.reason}"
            ) from None
        ids, starts = self._encode_offsets(text)
        cuts = np.searchsorted(starts, np.asarray(bounds[:-1], dtype=np.int64), side="left")
        edges = np.concatenate([[0], cuts, [len(ids)]])
        mask = np.zeros(len(ids), dtype=np.uint8)
        for a, b in gens:
            mask[np.searchsorted(starts, a, side="left") : np.searchsorted(starts, b, side="left")] = 1
        return RenderedTrajectory(
            id=tid,
            input_ids=ids,
            assistant_mask=mask,
            spans=np.stack([edges[:-1], edges[1:]], axis=1),
            roles=[m.role for m in messages],
            pinned=[m.pinned for m in messages],
            tool_names=[tuple(c.name for c in m.tool_calls) for m in messages],
        )

    def _layout(self, msgs: list[Message], tools: Tools) -> tuple[str, list[int], list[tuple[int, int]]]:
        """-> (canonical text, end character of each message, generated character ranges)."""
        first = next((i for i, m in enumerate(msgs) if m.role == "assistant"), len(msgs))
        if first == 0 and msgs:
            raise _Refusal(0, "an assistant turn needs a prompt (system/user message) before it")
        init = msgs[:first]
        text, bounds = self._prompt_layout(init, tools) if init else ("", [])
        parts, gens, i, block = [text], [], first, init
        while i < len(msgs):
            turn = self._turn(init if block is init else init + block, msgs[i], tools, i)
            j = next((k for k in range(i + 1, len(msgs)) if msgs[k].role == "assistant"), len(msgs))
            block = msgs[i + 1 : j]
            stop, btext, bb = self._block_layout(block, i + 1, not turn.has_stop) if block else ("", "", [])
            stop = stop or ("" if turn.has_stop else self.eot_text)
            pos = sum(map(len, parts)) + len(turn.header)
            gens.append((pos, pos + len(turn.body) + len(stop)))
            parts += [turn.header, turn.body, stop, turn.suffix]
            bounds.append(sum(map(len, parts)))
            bounds += [bounds[-1] + b for b in bb]
            parts.append(btext)
            i = j
        return "".join(parts), bounds, gens

    # -- incremental (agent loop) -------------------------------------------------------------------
    @staticmethod
    def _split_history(history: list[Message]) -> tuple[list[Message], list[Message], bool]:
        """-> (prompt messages, observations after the last assistant turn, any assistant turn yet)."""
        first = next((i for i, m in enumerate(history) if m.role == "assistant"), len(history))
        last = max((i for i, m in enumerate(history) if m.role == "assistant"), default=-1)
        return history[:first], history[last + 1 :], last >= 0

    def render_new(self, history: list[Message], new: list[Message], tools: Tools = None) -> list[np.ndarray]:
        """Token ids of each (non-assistant) message in ``new`` as the canonical stream places them after
        ``history`` (which ends with an assistant turn whose stop token is already in the stream)."""
        init, block, any_turn = self._split_history(history)
        if not any_turn:
            rt = self.render([*history, *new], tools=tools)
            return [rt.message_ids(k) for k in range(len(history), len(history) + len(new))]
        try:
            _, text, bounds = self._block_layout([*block, *new], len(history), not self.writes_stop)
        except _Refusal as e:
            raise RenderError(f"message {e.index}: chat template refused: {e.reason}") from None
        ids, starts = self._encode_offsets(text)
        ends = np.searchsorted(starts, np.asarray(bounds, dtype=np.int64), side="left")
        edges = [0, *ends.tolist()]
        return [ids[edges[k] : edges[k + 1]] for k in range(len(block), len(block) + len(new))]

    def assistant_pieces(
        self, history: list[Message], msg: Message, tools: Tools = None, pair: tuple[str, str] | None = None
    ) -> tuple[str, str, str]:
        """(header, generated text, suffix) of assistant ``msg`` after ``history``; the generated text ends
        with its stop token only when the template writes one (not GLM-4.5). ``pair``: ``context_texts`` of
        the same ``history`` and ``tools`` when the caller has it (saves two template renderings)."""
        init, block, any_turn = self._split_history(history)
        try:
            turn = self._turn(init + block if any_turn else init, msg, tools, len(history), pair)
        except _Refusal as e:
            raise RenderError(f"message {e.index}: chat template refused: {e.reason}") from None
        return turn.header, turn.body, turn.suffix

    def context_texts(self, history: list[Message], tools: Tools = None) -> tuple[str, str]:
        """The context the next assistant turn follows (the prompt and the messages after the last assistant
        turn), rendered without and with the generation prompt; the second extends the first."""
        init, block, any_turn = self._split_history(history)
        ctx = init + block if any_turn else init
        try:
            base, prompt = self._t(ctx, tools), self._t(ctx, tools, True)
        except _Refusal as e:
            raise RenderError(f"chat template refused the conversation: {e.reason}") from None
        if not prompt.startswith(base):
            raise ValueError("chat template's generation prompt does not extend the rendered history")
        return base, prompt

    def generation_prompt(
        self, history: list[Message], tools: Tools = None, pair: tuple[str, str] | None = None
    ) -> np.ndarray:
        """The header tokens the template writes before the model's next assistant turn (``pair``: as in
        ``assistant_pieces``)."""
        base, prompt = pair or self.context_texts(history, tools)
        return np.asarray(self.encode(prompt[len(base) :]), dtype=np.int32)

    def assistant_suffix(self) -> np.ndarray:
        """Tokens the template writes after an assistant's end-of-turn token (e.g. ChatML's newline)."""
        return np.asarray(self.encode(self._suffix_text), dtype=np.int32)

    def marker_ids(self, text: str) -> np.ndarray:
        """``text`` rendered as a user message after an assistant turn (the truncated-history marker)."""
        return np.asarray(self.encode(self._after([Message("user", text)], 0)), dtype=np.int32)


def render_all(
    trajectories: Iterable[Trajectory],
    renderer: Renderer,
    *,
    skip_invalid: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[RenderedTrajectory]:
    """Render a stream of trajectories. A template refusal raises ``RenderError``; with ``skip_invalid`` it is
    counted in ``stats.skipped`` (first 100 messages kept in ``stats.errors``) and the trajectory skipped."""
    for traj in trajectories:
        try:
            yield renderer.render(traj)
        except RenderError as e:
            if not skip_invalid:
                raise
            if stats is not None:
                stats.skipped += 1
                if len(stats.errors) < 100:
                    stats.errors.append(str(e))

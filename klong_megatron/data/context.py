"""ContextPolicy: the one algorithm that decides what the model sees (KLong trajectory splitting).

Dataflow: rendered messages (token ids + assistant mask + positions + tool names) -> ``ContextState.add``
one by one -> windows. The SFT splitter feeds a whole trajectory; the agent loop feeds messages as they
happen and asks ``ContextState.context(reserve)`` for the tokens to generate from. Both run this same code,
so every training window is a context the model really sees at inference (and, for rollouts, the
context its log-probs were computed in).

A window is ``pinned prefix + [truncation marker] + carried context + new messages``:
- pinned prefix: the messages marked ``pinned`` (a leading run), else the system + first user message,
  extended by the first ``prefix_turns`` assistant turns while it stays within ``prefix_cap`` tokens (a base
  prefix over the cap is an error naming the trajectory and sizes). With ``pin_reading`` the reading that
  starts the trajectory (every turn before the first ``write_tools`` call or a later user message) joins
  the prefix from the first window that starts after the reading ended (that window shares the reading's
  tail through its prefix instead of carried context); over the cap it is kept as head messages + one
  elided message + tail messages.
- a window grows message by message. Before an assistant message needing ``need = max(gen_reserve,
  its length)`` tokens, if the context plus ``need`` exceeds ``max_len`` the window is closed (it ends
  with its last assistant message) and a new one starts: prefix + marker + carried + the observations
  after the closed window's last turn ("openers", not shared). Carried = the closed window's most recent
  messages totalling at least ``min(max(overlap, carry_tokens), room)`` tokens, room being what the new
  window holds besides the openers and ``need``; the oldest one elided (head + tail) when a whole one does
  not fit. Progressive truncation (``keep_full_turns = k``): carried tool outputs older than the last k
  turns become excerpts of ``excerpt_tokens``, halved for every further k turns. Within a window the
  context only grows, so it is a single valid inference context.
- a single message longer than the room it can have is elided to head + marker + tail: an assistant
  message to the room after prefix and marker, any other message to half the room left after the
  generation reserve (so that an observation can always be carried over with the next turn).
- loss: assistant tokens are trained in the window where they are new (and prefix turns in window 0);
  with ``train_overlap`` also in every window that carries them. Markers are never trained.

Limits: assistant tokens removed by elision are never trained (``Window.elided`` counts them); the reading
is recognised by tool names only (a bash command that writes a file does not end it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klong_megatron.config.data import ContextPolicyConfig

PREFIX, MARKER, CARRIED, NEW = "prefix", "marker", "carried", "new"

TRUNCATION_TEXT = "[Earlier turns omitted to fit the context.]"
ELISION_TEXT = "\n[... truncated ...]\n"


@dataclass
class Piece:
    """Tokens of one message as placed in a context (maybe elided)."""

    msg: int
    role: str
    ids: np.ndarray
    mask: np.ndarray
    """assistant mask of these tokens (1 = generated)"""
    pos: np.ndarray
    """index of each token in the full rendering, -1 for inserted marker tokens"""
    lost: int = 0
    """generated tokens removed by elision"""
    tools: tuple[str, ...] = ()
    """names of the tools an assistant message calls"""
    cut: bool = False
    """elided (head + marker + tail)"""

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class Window:
    """One training sample / one model context."""

    trajectory_id: str
    window_index: int
    input_ids: np.ndarray
    """int32 [L], L <= max_len"""
    loss_mask: np.ndarray
    """uint8 [L]: 1 on the assistant tokens trained in this window"""
    positions: np.ndarray
    """int64 [L]: index in the full rendering of the trajectory, -1 for markers/elisions"""
    prefix_len: int
    segments: list[tuple[int, str, int, int]] = field(default_factory=list)
    """(message index or -1, prefix|marker|carried|new, start, end) in window coordinates"""
    elided: int = 0
    """assistant tokens of the new messages removed by elision (never trained)"""
    excerpted: int = 0
    """carried messages cut to excerpts by progressive truncation"""

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "trajectory_id": self.trajectory_id,
            "window_index": self.window_index,
            "input_ids": self.input_ids.tolist(),
            "loss_mask": self.loss_mask.tolist(),
            "prefix_len": self.prefix_len,
            "positions": self.positions.tolist(),
            "segments": [list(s) for s in self.segments],
        }


def elide(piece: Piece, budget: int, marker: np.ndarray) -> Piece:
    """Keep head and tail of ``piece`` around ``marker`` so that it has ``budget`` tokens.

    Returns the piece unchanged when it already fits. ``budget`` must exceed ``len(marker) + 1``.
    """
    if len(piece) <= budget:
        return piece
    keep = budget - len(marker)
    assert keep >= 2, f"elision budget {budget} too small for a {len(marker)}-token marker"
    tail = keep // 2
    head = keep - tail
    cut = lambda a, fill: np.concatenate([a[:head], np.full(len(marker), fill, a.dtype), a[len(a) - tail :]])  # noqa: E731
    ids = cut(piece.ids, 0)
    ids[head : head + len(marker)] = marker
    mask = cut(piece.mask, 0)
    lost = piece.lost + int(piece.mask.sum()) - int(mask.sum())
    return Piece(piece.msg, piece.role, ids, mask, cut(piece.pos, -1), lost, piece.tools, True)


def fit_pieces(pieces: list[Piece], budget: int, marker: np.ndarray) -> list[Piece]:
    """At most ``budget`` tokens of ``pieces``: whole head messages (up to half), whole tail messages, and
    the first message that fits neither elided into what is left (the messages between it and the tail go)."""
    if sum(map(len, pieces)) <= budget:
        return pieces
    head, tail, used, i, j = [], [], 0, 0, len(pieces)
    while i < j and used + len(pieces[i]) <= budget // 2:
        used += len(pieces[i])
        head.append(pieces[i])
        i += 1
    while j > i and used + len(pieces[j - 1]) <= budget:
        used += len(pieces[j - 1])
        tail.insert(0, pieces[j - 1])
        j -= 1
    mid = [elide(pieces[i], budget - used, marker)] if i < j and budget - used >= len(marker) + 2 else []
    return head + mid + tail


class ContextPolicy:
    """Configuration + the rendered marker tokens. Stateless; ``start()`` makes a ``ContextState``."""

    def __init__(self, cfg: ContextPolicyConfig, marker_ids: np.ndarray, elision_ids: np.ndarray):
        self.cfg = cfg
        self.marker_ids = np.asarray(marker_ids, dtype=np.int32)
        self.elision_ids = np.asarray(elision_ids, dtype=np.int32)

    @classmethod
    def from_renderer(cls, cfg: ContextPolicyConfig, renderer: Any) -> ContextPolicy:
        """Markers rendered with the renderer's chat template (truncation) and tokenizer (elision)."""
        return cls(cfg, renderer.marker_ids(TRUNCATION_TEXT), np.asarray(renderer.encode(ELISION_TEXT)))

    def start(self, trajectory_id: str = "") -> ContextState:
        return ContextState(self, trajectory_id)


class ContextState:
    """Incremental window builder; feed messages in order with ``add``; see the module docstring."""

    def __init__(self, policy: ContextPolicy, trajectory_id: str = ""):
        self.policy = policy
        self.cfg = policy.cfg
        self.trajectory_id = trajectory_id
        self.windows: list[Window] = []
        self.prefix: list[Piece] = []
        self.prefix_len = 0
        self.prefix_open = True
        self._pinned_mode: bool | None = None
        self._seen_user = False
        self._prefix_turns = 0
        self.reading: list[Piece] | None = [] if self.cfg.pin_reading else None
        """pin_reading: messages of the reading so far (None once it ended or when off)"""
        self.next_prefix: list[Piece] | None = None
        """the prefix of windows that start from now on (pin_reading, after the reading ended)"""
        self.body: list[tuple[Piece, str]] = []  # (piece, CARRIED|NEW)
        self.body_len = 0
        self.marked = False  # current window carries the truncation marker
        self.excerpted = 0  # carried messages cut by progressive truncation in the current window
        self.next_msg = 0

    # -- public API --------------------------------------------------------------------------------
    def add(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        pos: np.ndarray,
        role: str,
        pinned: bool = False,
        tools: tuple[str, ...] = (),
    ) -> None:
        """Append the next message's tokens (``ids``/``mask``/``pos`` of equal length); ``tools``: the names of
        the tools an assistant message calls (pin_reading)."""
        piece = Piece(self.next_msg, role, np.asarray(ids), np.asarray(mask), np.asarray(pos), 0, tuple(tools))
        self.next_msg += 1
        need = max(self.cfg.gen_reserve, len(piece)) if role == "assistant" else len(piece)
        if self.prefix_open:
            if self._joins_prefix(role, need, pinned, piece.msg):
                self._prefix_turns += role == "assistant"
                self.prefix.append(piece)
                self.prefix_len += len(piece)
                return
            self._close_prefix()
        elif pinned:
            raise ValueError(
                f"trajectory {self.trajectory_id!r}: message {piece.msg} is pinned but comes after "
                "unpinned messages (pinned messages must be a leading run)"
            )
        if role == "assistant":
            piece = elide(piece, self._avail(), self.policy.elision_ids)
            self._make_room(max(self.cfg.gen_reserve, len(piece)), piece.msg)
        else:  # at most half the room, so that it can be carried over together with the next turn
            piece = elide(piece, (self._avail() - self.cfg.gen_reserve) // 2, self.policy.elision_ids)
        self.body.append((piece, NEW))
        self.body_len += len(piece)
        self._read(piece)

    def context(self, reserve: int | None = None) -> np.ndarray:
        """Tokens the model sees before generating its next turn, leaving ``reserve`` tokens free
        (default ``gen_reserve``). May start a new window, exactly as ``add`` of that turn would."""
        reserve = self.cfg.gen_reserve if reserve is None else reserve
        if self.prefix_open and not (
            self._pinned_mode is False and self._seen_user and self._joins_prefix("assistant", reserve, False, -1)
        ):
            self._close_prefix()
        if not self.prefix_open:
            self._make_room(reserve, self.next_msg)
        parts = [p.ids for p in self.prefix]
        if self.marked:
            parts.append(self.policy.marker_ids)
        parts += [p.ids for p, _ in self.body]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def finish(self) -> list[Window]:
        """Close the last window; returns all windows of the trajectory."""
        if self.prefix_open:
            self._close_prefix()
        self._emit()
        return self.windows

    # -- prefix --------------------------------------------------------------------------------------
    def _joins_prefix(self, role: str, size: int, pinned: bool, msg: int) -> bool:
        """Whether the next message (``size`` tokens, or the generation reserve) extends the prefix."""
        if self._pinned_mode is None:
            self._pinned_mode = pinned
        if self._pinned_mode:
            return pinned
        if pinned:
            raise ValueError(
                f"trajectory {self.trajectory_id!r}: message {msg} is pinned but message 0 is not "
                "(pinned messages must be a leading run)"
            )
        if not self._seen_user:
            self._seen_user = role == "user"
            return True
        turns = self._prefix_turns + (role == "assistant")
        return 0 < turns <= self.cfg.prefix_turns and self.prefix_len + size <= self.cfg.prefix_cap

    def _close_prefix(self) -> None:
        self.prefix_open = False
        cap = self.cfg.prefix_cap
        if self.prefix_len > cap:
            raise ValueError(
                f"trajectory {self.trajectory_id!r}: the pinned prefix (messages 0..{len(self.prefix) - 1}) has "
                f"{self.prefix_len} tokens, more than max_prefix_tokens={cap} (max_len={self.cfg.max_len})"
            )
        room = (self._avail() - self.cfg.gen_reserve) // 2
        if room < len(self.policy.elision_ids) + 2:
            raise ValueError(
                f"trajectory {self.trajectory_id!r}: max_len={self.cfg.max_len} leaves {room} tokens after the "
                f"{self.prefix_len}-token prefix, marker and gen_reserve={self.cfg.gen_reserve}"
            )

    def _read(self, piece: Piece) -> None:
        """pin_reading: collect the reading; after its last message, fix the prefix of the next windows."""
        if self.reading is None:
            return
        if piece.role == "user" or any(t in self.cfg.write_tools for t in piece.tools):
            done, self.reading = self.reading, None
            free = self.cfg.max_len - len(self.policy.marker_ids) - self.cfg.gen_reserve - self.prefix_len
            budget = min(self.cfg.prefix_cap - self.prefix_len, free // 2 - 2 * len(self.policy.elision_ids))
            if done and budget > len(self.policy.elision_ids) + 2:
                self.next_prefix = self.prefix + fit_pieces(done, budget, self.policy.elision_ids)
            return
        self.reading.append(piece)

    def _avail(self) -> int:
        """Tokens a window has after the prefix (or the longer one it will have) and the truncation marker."""
        nxt = sum(map(len, self.next_prefix)) if self.next_prefix else 0
        return self.cfg.max_len - max(self.prefix_len, nxt) - len(self.policy.marker_ids)

    # -- windows -----------------------------------------------------------------------------------
    def _length(self) -> int:
        return self.prefix_len + (len(self.policy.marker_ids) if self.marked else 0) + self.body_len

    def _make_room(self, need: int, pending: int) -> None:
        """Start a new window unless ``need`` more tokens fit; ``pending`` is the next message's index."""
        if self._length() + need <= self.cfg.max_len:
            return
        last = max((i for i, (p, kind) in enumerate(self.body) if p.role == "assistant" and kind == NEW), default=-1)
        if last < 0:  # nothing new was trained: the window's shared part is what it carried
            last = next((i for i, (_, kind) in enumerate(self.body) if kind == NEW), len(self.body)) - 1
        self._emit()
        if self.next_prefix is not None:
            self.prefix, self.next_prefix = self.next_prefix, None
            self.prefix_len = sum(map(len, self.prefix))
        start = max(p.msg for p in self.prefix) + 1 if self.prefix else 0
        shared = [p for p, _ in self.body[: last + 1] if p.msg >= start]
        openers = [p for p, _ in self.body[last + 1 :] if p.msg >= start]
        room = self._avail() - need
        if sum(map(len, openers)) > room:  # several long observations: share the room between them
            per = room // len(openers)
            if per >= len(self.policy.elision_ids) + 2:
                openers = [elide(p, per, self.policy.elision_ids) for p in openers]
            while openers and sum(map(len, openers)) > room:  # no room at all: the oldest go
                openers.pop(0)
        carried = self._carry(shared, room - sum(map(len, openers)))
        self.marked = (carried[0].msg if carried else openers[0].msg if openers else pending) > start
        self.body = [(p, CARRIED) for p in carried] + [(p, NEW) for p in openers]
        self.body_len = sum(len(p) for p, _ in self.body)

    def _carry(self, shared: list[Piece], room: int) -> list[Piece]:
        """Most recent of ``shared`` (the closed window's messages) totalling at least
        ``min(max(overlap, carry_tokens), room)`` tokens, within ``room``; older turns' tool outputs excerpted."""
        target = min(max(self.cfg.overlap, self.cfg.carry_tokens or 0), room)
        k, marker = self.cfg.keep_full_turns, self.policy.elision_ids
        pieces, turns, total = [], 0, 0
        self.excerpted = 0
        for piece in reversed(shared):
            if total >= target:
                break
            if k is not None and turns >= k and piece.role == "tool":
                size = max(self.cfg.excerpt_tokens >> ((turns - k) // max(k, 1)), len(marker) + 8)
                if len(piece) > size:
                    piece = elide(piece, size, marker)
                self.excerpted += piece.cut
            turns += piece.role == "assistant"
            if total + len(piece) > room:
                if room - total >= len(marker) + 2:
                    pieces.append(elide(piece, room - total, marker))
                break
            pieces.append(piece)
            total += len(piece)
        pieces.reverse()
        return pieces

    def _emit(self) -> None:
        """Close the current window (up to its last assistant message) if it trains anything."""
        last = max((i for i, (p, kind) in enumerate(self.body) if p.role == "assistant" and kind == NEW), default=-1)
        first = not self.windows
        if last < 0 and not (first and any(p.mask.any() for p in self.prefix)):
            return
        index = len(self.windows)
        train_prefix = first or self.cfg.train_overlap
        parts: list[tuple[Piece | None, str]] = [(p, PREFIX) for p in self.prefix]
        if self.marked:
            parts.append((None, MARKER))
        parts += self.body[: last + 1]
        ids, mask, pos, segments, start = [], [], [], [], 0
        for piece, kind in parts:
            if piece is None:
                m = self.policy.marker_ids
                ids.append(m), mask.append(np.zeros(len(m), np.uint8)), pos.append(np.full(len(m), -1))
                segments.append((-1, MARKER, start, start + len(m)))
                start += len(m)
                continue
            trained = kind == NEW or (kind == CARRIED and self.cfg.train_overlap) or (kind == PREFIX and train_prefix)
            n = piece.ids.shape[0]
            ids.append(piece.ids)
            mask.append(piece.mask.astype(np.uint8, copy=False) if trained else np.zeros(n, np.uint8))
            pos.append(piece.pos)
            segments.append((piece.msg, kind, start, start + n))
            start += n
        self.windows.append(
            Window(
                trajectory_id=self.trajectory_id,
                window_index=index,
                input_ids=np.concatenate(ids).astype(np.int32, copy=False),
                loss_mask=np.concatenate(mask),
                positions=np.concatenate(pos).astype(np.int64, copy=False),
                prefix_len=self.prefix_len,
                segments=segments,
                elided=sum(p.lost for p, kind in self.body[: last + 1] if kind == NEW),
                excerpted=self.excerpted,
            )
        )

"""Agent trajectories: schema and streaming JSONL IO.

One JSON object per line: ``{"id": str, "messages": [...], "tools": [...], "meta": {...}}``. Messages follow the OpenAI
chat format (``role`` in system/user/assistant/tool, ``content`` as a string or a list of text parts,
assistant ``tool_calls`` with ``function.name`` / ``function.arguments``, tool ``tool_call_id``), plus
two optional fields: ``pinned: true`` on the messages that form the pinned prefix, and reasoning text
(``reasoning_content`` or ``reasoning``) on assistant messages. ``tools`` (optional) lists the OpenAI function
schemas the agent had (``{"type": "function", "function": {"name", "description", "parameters"}}``); rendering
passes them to the chat template, which puts them in the system or first user turn (the pinned prefix).

Reading streams line by line (files larger than memory are fine). A malformed line raises
``TrajectoryError`` naming the file, line and field; with ``skip_invalid`` it is counted and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.atomic import atomic_output
from klong_megatron.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


class TrajectoryError(UserError):
    """A malformed trajectory; the message names ``file:line`` and the field."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """JSON text, exactly as the model wrote it."""
    id: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    pinned: bool = False

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI-format dict (what chat templates consume)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "type": "function",
                    **({"id": c.id} if c.id else {}),
                    "function": {"name": c.name, "arguments": _arguments_obj(c.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        return out

    def to_json(self) -> dict[str, Any]:
        """The message as stored in trajectory JSONL (arguments kept as JSON text)."""
        out = self.to_openai()
        if self.tool_calls:
            for call, raw in zip(out["tool_calls"], self.tool_calls, strict=True):
                call["function"]["arguments"] = raw.arguments
        if self.pinned:
            out["pinned"] = True
        return out


def _arguments_obj(arguments: str) -> Any:
    """Chat templates (Qwen, Hermes) expect a mapping; keep malformed JSON as the raw text."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


@dataclass
class Trajectory:
    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    """OpenAI function schemas given to the chat template (None: no tools)."""
    source: str | None = field(default=None, compare=False)
    """``file:line`` the trajectory was read from (error messages); not serialised."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": [m.to_json() for m in self.messages]}
        if self.tools is not None:
            out["tools"] = self.tools
        out["meta"] = self.meta
        return out


def parse_tools(obj: Any, where: str) -> list[dict[str, Any]]:
    """Validate an OpenAI ``tools`` list (function schemas); ``where`` prefixes error messages."""
    if not isinstance(obj, list):
        raise TrajectoryError(f"{where}: field 'tools': expected a list of function schemas")
    for k, tool in enumerate(obj):
        at = f"{where}: field 'tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise TrajectoryError(f"{at}': expected an object with type 'function', got {tool!r:.80}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise TrajectoryError(f"{at}.function': missing or not an object")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise TrajectoryError(f"{at}.function.name': missing or not a non-empty string")
        if not isinstance(fn.get("description", ""), str):
            raise TrajectoryError(f"{at}.function.description': expected a string")
        params = fn.get("parameters", {})
        if not isinstance(params, dict) or params and params.get("type") != "object":
            raise TrajectoryError(f"{at}.function.parameters': expected a JSON schema object with type 'object'")
    return obj


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for k, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TrajectoryError(f"{where}[{k}]: only text parts are supported, got {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    raise TrajectoryError(f"{where}: expected a string or a list of text parts, got {type(value).__name__}")


def _tool_call(obj: Any, where: str) -> ToolCall:
    if not isinstance(obj, dict):
        raise TrajectoryError(f"{where}: expected an object, got {type(obj).__name__}")
    fn = obj.get("function")
    if not isinstance(fn, dict):
        raise TrajectoryError(f"{where}.function: missing or not an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise TrajectoryError(f"{where}.function.name: missing or not a non-empty string")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    elif not isinstance(args, str):
        raise TrajectoryError(f"{where}.function.arguments: expected a JSON string or object")
    call_id = obj.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise TrajectoryError(f"{where}.id: expected a string")
    return ToolCall(name=name, arguments=args, id=call_id)


def parse_message(obj: Any, where: str) -> Message:
    """Validate one OpenAI-format message dict; ``where`` prefixes error messages."""
    if not isinstance(obj, dict):
        raise TrajectoryError(f"{where}: expected an object, got {type(obj).__name__}")
    role = obj.get("role")
    if role not in ROLES:
        raise TrajectoryError(f"{where}.role: expected one of {ROLES}, got {role!r}")
    calls_raw = obj.get("tool_calls") or []
    if not isinstance(calls_raw, list):
        raise TrajectoryError(f"{where}.tool_calls: expected a list")
    if calls_raw and role != "assistant":
        raise TrajectoryError(f"{where}.tool_calls: only assistant messages carry tool calls (role is {role!r})")
    calls = tuple(_tool_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(calls_raw))
    reasoning = obj.get("reasoning_content", obj.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise TrajectoryError(f"{where}.reasoning_content: expected a string")
    pinned = obj.get("pinned", False)
    if not isinstance(pinned, bool):
        raise TrajectoryError(f"{where}.pinned: expected true/false, got {pinned!r}")
    for key in ("tool_call_id", "name"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise TrajectoryError(f"{where}.{key}: expected a string")
    return Message(
        role=role,
        content=_text(obj.get("content"), f"{where}.content"),
        tool_calls=calls,
        tool_call_id=obj.get("tool_call_id"),
        name=obj.get("name"),
        reasoning=reasoning,
        pinned=pinned,
    )


def parse_trajectory(obj: Any, where: str) -> Trajectory:
    """Validate one trajectory object; ``where`` (e.g. ``"data.jsonl:12"``) prefixes errors."""
    if not isinstance(obj, dict):
        raise TrajectoryError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    tid = obj.get("id")
    if not isinstance(tid, str | int) or isinstance(tid, bool) or tid == "":
        raise TrajectoryError(f"{where}: field 'id': missing or not a string")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TrajectoryError(f"{where}: field 'messages': missing, empty or not a list")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise TrajectoryError(f"{where}: field 'meta': expected an object")
    messages = [parse_message(m, f"{where}: field 'messages[{k}]'") for k, m in enumerate(msgs)]
    tools = parse_tools(obj["tools"], where) if obj.get("tools") is not None else None
    return Trajectory(id=str(tid), messages=messages, meta=meta, tools=tools, source=where)


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def read_trajectories(
    paths: str | Path | Iterable[str | Path], *, skip_invalid: bool = False, stats: ReadStats | None = None
) -> Iterator[Trajectory]:
    """Stream trajectories from JSONL files, one line at a time.

    Blank lines are ignored. With ``skip_invalid`` malformed lines are counted in ``stats`` (the first
    100 errors kept) instead of raising ``TrajectoryError``.
    """
    stats = stats if stats is not None else ReadStats()
    for path in [paths] if isinstance(paths, str | Path) else paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TrajectoryError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                    traj = parse_trajectory(obj, where)
                except TrajectoryError as e:
                    if not skip_invalid:
                        raise
                    stats.skipped += 1
                    if len(stats.errors) < 100:
                        stats.errors.append(str(e))
                    continue
                stats.read += 1
                yield traj


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write dict records as JSONL; returns the number written. Atomic: an error while the records are
    produced (a malformed trajectory, Ctrl-C) leaves no partial file at ``path``."""
    n = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n

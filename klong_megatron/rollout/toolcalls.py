"""Tool calls in generated text -> structured calls, for the model families we target.

- ``hermes`` (Qwen2.5/Qwen3, Hermes, the bundled byte tokenizer's template)::

      <tool_call>
      {"name": "bash", "arguments": {"cmd": "ls"}}
      </tool_call>

- ``glm45`` (GLM-4.5 / GLM-4.6)::

      <tool_call>bash
      <arg_key>cmd</arg_key>
      <arg_value>ls</arg_value>
      </tool_call>

Both: an optional leading ``<think>...</think>`` block becomes ``reasoning``; text before the first
tool call is ``content``. A malformed block (unterminated, bad JSON, no name, non-object arguments,
unpaired keys/values) is not executed: it becomes an entry of ``errors`` naming the block and what
is wrong, which the agent loop turns into an error observation for the model.

Limits: GLM argument values are parsed as JSON when they parse (numbers, lists, objects, booleans)
and kept as strings otherwise; without the tool schema a string like ``"42"`` becomes the number 42.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from klong_megatron.data.trajectory import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_THINK = re.compile(r"\A\s*<think>\n?(.*?)\n?</think>\n?", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass(frozen=True)
class ParsedTurn:
    """One assistant turn's text, split. ``calls`` are the well-formed calls in order."""

    content: str
    reasoning: str | None
    calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]


def _split(text: str) -> tuple[str | None, str, list[str], list[str]]:
    """-> (reasoning, content, call block bodies, errors for unterminated blocks)."""
    reasoning = None
    m = _THINK.match(text)
    if m:
        reasoning, text = m.group(1), text[m.end() :]
    first = text.find(OPEN)
    content = text if first < 0 else text[:first]
    rest = "" if first < 0 else text[first:]
    bodies = [b.group(1) for b in _BLOCK.finditer(rest)]
    errors = []
    tail = _BLOCK.sub("", rest)
    if OPEN in tail:
        errors.append(f"tool call {len(bodies) + 1}: unterminated {OPEN} (no {CLOSE}; was the turn cut off?)")
    return reasoning, content.rstrip("\n"), bodies, errors


def _hermes_call(body: str, k: int) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"tool call {k}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"tool call {k}: expected a JSON object with name and arguments")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call {k}: field 'name' missing or not a string")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call {k} ({name}): arguments string is not JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {k} ({name}): field 'arguments' must be an object")
    return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))


def _glm_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _glm45_call(body: str, k: int) -> ToolCall:
    cut = body.find("<arg_key>")
    name = (body if cut < 0 else body[:cut]).strip()
    if not name or "<" in name:
        raise ValueError(f"tool call {k}: no function name before the first <arg_key>")
    rest = "" if cut < 0 else body[cut:]
    pairs = _GLM_ARG.findall(rest)
    leftover = _GLM_ARG.sub("", rest).strip()
    if leftover:
        raise ValueError(f"tool call {k} ({name}): unpaired <arg_key>/<arg_value> near {leftover[:40]!r}")
    args = {key.strip(): _glm_value(value) for key, value in pairs}
    return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))


def _parser(call: Callable[[str, int], ToolCall]) -> Callable[[str], ParsedTurn]:
    def parse(text: str) -> ParsedTurn:
        reasoning, content, bodies, errors = _split(text)
        calls = []
        for k, body in enumerate(bodies, 1):
            try:
                calls.append(call(body.strip("\n"), k))
            except ValueError as e:
                errors.append(str(e))
        return ParsedTurn(content, reasoning, tuple(calls), tuple(errors))

    return parse


parse_hermes = _parser(_hermes_call)
parse_glm45 = _parser(_glm45_call)
PARSERS: dict[str, Callable[[str], ParsedTurn]] = {"hermes": parse_hermes, "glm45": parse_glm45}


def format_hermes(name: str, arguments: dict) -> str:
    """The text of one Hermes tool call as a model writes it (demo policies, tests)."""
    return f'{OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{CLOSE}'


def format_glm45(name: str, arguments: dict) -> str:
    """The text of one GLM-4.5 tool call as a model writes it."""
    args = "".join(
        f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
        for k, v in arguments.items()
    )
    return f"{OPEN}{name}\n{args}{CLOSE}"


def tools_prompt(schemas: list[dict], fmt: str = "hermes") -> str:
    """Tool descriptions + calling convention as system-prompt text, for chat templates that ignore
    ``tools=`` (the bundled ``byte``/``demo_bpe`` ones). Templates that render tools (Qwen, GLM-4.5,
    Llama-3.1) get ``ToolSet.schemas()`` from the agent loop instead (``Renderer.render(tools=...)``)."""
    listing = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    example = format_hermes("name", {"arg": "value"}) if fmt == "hermes" else format_glm45("name", {"arg": "value"})
    return (
        "# Tools\n\nYou may call one or more functions to assist with the task. "
        f"Function signatures:\n<tools>\n{listing}\n</tools>\n\n"
        f"For each function call, write:\n{example}"
    )

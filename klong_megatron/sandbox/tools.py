"""The agent's tools (PaperBench-style) over a Sandbox, with JSON-schema descriptions for the model.

Dataflow: the agent loop takes ``ToolSet.schemas()`` into the chat template, parses the model's tool
call and hands ``(name, arguments_json)`` to ``ToolSet.call``, which validates the arguments, runs
the tool in the sandbox and returns an ``Observation`` whose text goes back to the model as the
tool message. Every mistake of the model (unknown tool, malformed JSON, a missing or mistyped
argument, a missing file, a blacklisted URL, an early submit) becomes an observation explaining
it; only a broken sandbox (``SandboxError``) propagates, for the rollout manager to retry.

Observations longer than ``max_observation_bytes`` are cut to head + tail with a marker; bytes that
are not UTF-8 are replaced. Every ``reminder_every`` calls a time reminder is appended.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klong_megatron.config.sandbox import ToolsConfig
from klong_megatron.sandbox._common import OutputCapture, SandboxError
from klong_megatron.sandbox.base import ExecResult, Sandbox
from klong_megatron.sandbox.blacklist import Blacklist
from klong_megatron.sandbox.tool_specs import MAX_CHUNK_LINES, MAX_INLINE_CODE, SPECS


@dataclass(frozen=True)
class Observation:
    """What the model sees after a tool call. ``ok`` is False for errors, refusals and failed commands."""

    text: str
    tool: str
    ok: bool
    submitted: bool = False
    blocked_url: str | None = None


@dataclass
class Violation:
    """A refused attempt to fetch a blacklisted resource."""

    step: int
    tool: str
    url: str
    command: str


class ToolError(Exception):
    """A mistake of the model, reported back to it as the observation text."""


def _fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def clip(text: str, limit: int) -> str:
    """Cut ``text`` to about ``limit`` UTF-8 bytes: head + marker + tail."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    cap = OutputCapture(limit)
    cap.feed(data)
    return cap.text()


@dataclass
class ToolSet:
    """The tools of one rollout, bound to its sandbox and its clock.

    ``clock`` returns seconds (monotonic); the budget starts at ``start_time`` (default: now).
    """

    sandbox: Sandbox
    cfg: ToolsConfig = field(default_factory=ToolsConfig)
    blacklist: Blacklist | None = None
    clock: Callable[[], float] = time.monotonic
    start_time: float | None = None
    steps: int = field(default=0, init=False)
    """Tool calls so far (the reminder counts these)."""
    violations: list[Violation] = field(default_factory=list, init=False)
    """Refused blacklisted fetches, for the rollout's metadata and the monitor."""

    def __post_init__(self) -> None:
        if self.start_time is None:
            self.start_time = self.clock()
        if self.blacklist is None and self.cfg.blacklist_file:
            self.blacklist = Blacklist.from_file(self.cfg.blacklist_file)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI ``tools`` entries: ``{"type": "function", "function": {name, description, parameters}}``."""
        return [{"type": "function", "function": {"name": n, **spec}} for n, spec in SPECS.items()]

    @property
    def elapsed_s(self) -> float:
        assert self.start_time is not None
        return self.clock() - self.start_time

    def call(self, name: str, arguments: str | dict[str, Any] | None) -> Observation:
        """Run one tool call; never raises for the model's mistakes (see the module docstring)."""
        self.steps += 1
        try:
            args = self._parse(name, arguments)
            obs = getattr(self, f"_tool_{name}")(**args)
        except ToolError as e:
            obs = Observation(f"Error: {e}", name, ok=False)
        except (OSError, ValueError, UnicodeError) as e:
            obs = Observation(f"Error: {e}", name, ok=False)
        except SandboxError:
            raise
        text = clip(obs.text, self.cfg.max_observation_bytes)
        if self.cfg.reminder_every and self.steps % self.cfg.reminder_every == 0:
            text += f"\n[time: {_fmt_duration(self.elapsed_s)} of {_fmt_duration(self.cfg.time_budget_s)} elapsed]"
        return Observation(text, obs.tool, obs.ok, obs.submitted, obs.blocked_url)

    # -- argument checking ------------------------------------------------------------------------
    def _parse(self, name: str, arguments: str | dict[str, Any] | None) -> dict[str, Any]:
        if name not in SPECS:
            raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(SPECS)}")
        if arguments is None or arguments == "":
            args: Any = {}
        elif isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"arguments of {name} are not valid JSON ({e.msg} at char {e.pos})") from None
        else:
            args = arguments
        if not isinstance(args, dict):
            raise ToolError(f"arguments of {name} must be a JSON object, got {type(args).__name__}")
        params = SPECS[name]["parameters"]
        props = params["properties"]
        if unknown := sorted(set(args) - set(props)):
            raise ToolError(f"{name} has no argument(s) {unknown}; it takes {sorted(props)}")
        if missing := [p for p in params.get("required", []) if p not in args]:
            raise ToolError(f"{name} needs argument(s) {missing}")
        py_types = {"string": str, "integer": int, "number": (int, float)}
        for key, value in args.items():
            want = props[key]["type"]
            if not isinstance(value, py_types[want]) or isinstance(value, bool):
                article = "an" if want[0] in "aeiou" else "a"
                raise ToolError(f"argument {key!r} of {name} must be {article} {want}, got {json.dumps(value)[:40]}")
        return args

    def _guard(self, tool: str, command: str) -> Observation | None:
        if self.blacklist and (url := self.blacklist.match(command)) is not None:
            self.violations.append(Violation(self.steps, tool, url, command))
            msg = f"Refused: this would access {url}, which is blacklisted for this task. Do not use that resource."
            return Observation(msg, tool, ok=False, blocked_url=url)
        return None

    def _timeout(self, requested: float | None) -> float:
        if requested is not None and requested <= 0:
            raise ToolError(f"timeout must be > 0 seconds, got {requested}")
        return min(requested or self.cfg.command_timeout_s, self.cfg.command_timeout_s)

    # -- the tools ------------------------------------------------------------------------------------
    def _tool_bash(self, command: str, timeout: float | None = None) -> Observation:
        if refused := self._guard("bash", command):
            return refused
        res = self.sandbox.exec("exec bash -c " + shlex.quote(command), timeout=self._timeout(timeout))
        return _exec_observation("bash", res)

    def _tool_python(self, code: str, timeout: float | None = None) -> Observation:
        if refused := self._guard("python", code):
            return refused
        if len(code.encode()) > MAX_INLINE_CODE:
            raise ToolError(f"code is over {MAX_INLINE_CODE} bytes; write it to a file and run it with bash")
        res = self.sandbox.exec("exec python3 -c " + shlex.quote(code), timeout=self._timeout(timeout))
        return _exec_observation("python", res)

    def _lines(self, file: str) -> list[str]:
        return self.sandbox.read_file(file).decode("utf-8", errors="replace").splitlines()

    def _tool_read_file_chunk(self, file: str, start_line: int = 1, max_lines: int = MAX_CHUNK_LINES) -> Observation:
        if not 1 <= max_lines <= MAX_CHUNK_LINES:
            raise ToolError(f"max_lines must be between 1 and {MAX_CHUNK_LINES}, got {max_lines}")
        if start_line < 1:
            raise ToolError(f"start_line must be >= 1, got {start_line}")
        lines = self._lines(file)
        if start_line > max(len(lines), 1):
            raise ToolError(f"start_line {start_line} is past the end of {file} ({len(lines)} lines)")
        chunk = lines[start_line - 1 : start_line - 1 + max_lines]
        end = start_line + len(chunk) - 1
        body = "\n".join(f"{start_line + i:6d}\t{ln}" for i, ln in enumerate(chunk))
        return Observation(f"[{file}: lines {start_line}-{end} of {len(lines)}]\n{body}", "read_file_chunk", True)

    def _tool_search_file(self, file: str, query: str, context_lines: int = 2) -> Observation:
        if not query:
            raise ToolError("query must not be empty")
        if not 0 <= context_lines <= 10:
            raise ToolError(f"context_lines must be between 0 and 10, got {context_lines}")
        lines = self._lines(file)
        hits = [i for i, ln in enumerate(lines) if query.lower() in ln.lower()]
        if not hits:
            return Observation(f"No line of {file} contains {query!r}.", "search_file", True)
        shown, blocks, last = hits[:20], [], -1
        for i in shown:
            lo, hi = max(i - context_lines, last + 1), min(i + context_lines, len(lines) - 1)
            if lo > last + 1 and blocks:
                blocks.append("--")
            blocks += [f"{j + 1:6d}{'>' if j in hits else ' '}\t{lines[j]}" for j in range(lo, hi + 1)]
            last = hi
        more = f"; showing the first {len(shown)}" if len(hits) > len(shown) else ""
        return Observation(f"[{len(hits)} matching lines in {file}{more}]\n" + "\n".join(blocks), "search_file", True)

    def _tool_write_file(self, file: str, content: str) -> Observation:
        self.sandbox.write_file(file, content)
        return Observation(f"Wrote {len(content.encode())} bytes to {file}.", "write_file", True)

    def _tool_edit_file(self, file: str, old_str: str, new_str: str) -> Observation:
        if not old_str:
            raise ToolError("old_str must not be empty")
        text = self.sandbox.read_file(file).decode("utf-8", errors="replace")
        n = text.count(old_str)
        if n != 1:
            where = "does not occur" if n == 0 else f"occurs {n} times"
            raise ToolError(f"old_str {where} in {file}; it must occur exactly once (add surrounding lines)")
        self.sandbox.write_file(file, text.replace(old_str, new_str, 1))
        line = text[: text.index(old_str)].count("\n") + 1
        return Observation(
            f"Edited {file} at line {line}: replaced {len(old_str)} chars by {len(new_str)}.", "edit_file", True
        )

    def _tool_submit(self, summary: str = "") -> Observation:
        earliest = self.cfg.submit_min_fraction * self.cfg.time_budget_s
        if self.elapsed_s < earliest:
            return Observation(
                f"Submission refused: only {_fmt_duration(self.elapsed_s)} of {_fmt_duration(self.cfg.time_budget_s)}"
                f" have passed; submitting is allowed after {_fmt_duration(earliest)}. Use the remaining time to"
                " test and improve your work.",
                "submit",
                ok=False,
            )
        return Observation("Submitted. Your work directory will now be graded.", "submit", True, submitted=True)


def _exec_observation(tool: str, res: ExecResult) -> Observation:
    parts = [res.stdout.rstrip("\n")] if res.stdout else []
    if res.stderr:
        parts.append("[stderr]\n" + res.stderr.rstrip("\n"))
    if res.timed_out:
        parts.append(f"[timed out after {res.duration_s:.0f} s; the command and its processes were killed]")
    elif res.oom_killed:
        parts.append(f"[killed: out of memory; exit code {res.exit_code}]")
    else:
        parts.append(f"[exit code {res.exit_code}]")
    return Observation("\n".join(parts), tool, ok=res.exit_code == 0)

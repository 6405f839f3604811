"""The long-horizon agent loop: context -> engine -> tool calls -> sandbox -> observations.

Dataflow per turn::

    task messages + Tools.schemas() -> chat template (tools in the system / first user turn, pinned)
    ContextState.context()  (the SFT splitter's ContextPolicy: pinned prefix, truncation, overlap)
      + generation prompt   -> Engine.generate (token ids in/out, log-probs, stops on the template's stop tokens)
      -> decode -> parse tool calls (hermes | glm45) -> Tools.call in a worker thread
      -> tool / error observations -> rendered once (chat template) -> ContextState.add

Every message's tokens are kept exactly as the model saw (assistant: header + engine output ids
+ end-of-turn suffix; the renderer's canonical stream, so that re-rendering the finished trajectory
gives the same tokens) and recorded in ``meta.message_ids`` with the per-turn ``steps`` (output ids,
log-probs, sampling temperature, finish reason, weight version, server, generation and tool timings), so
``rendered_from_record`` rebuilds the very token stream the splitter turns into training windows:
the contexts of a rollout are exactly its windows' prefixes (tested).

The assistant message is stored structured (content, reasoning, tool_calls) when the chat
template renders that back to the same text, otherwise as the raw text (nothing is lost).

Limits: ``policy.gen_reserve`` must hold a whole turn (header + max_new_tokens + suffix) so that
inference and the splitter cut windows at the same places (checked). Observations are rendered after
a stand-in turn (``Renderer.render_new``), never by re-rendering history.
A turn cut off by the timeout is dropped; a turn cut by ``max_new_tokens`` gets the end-of-turn
token appended (``steps[i].appended_eot``; it has no behaviour log-prob).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from klong_megatron.config.rollout import RolloutConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import RenderedTrajectory, Renderer
from klong_megatron.data.trajectory import Message, ToolCall, Trajectory
from klong_megatron.rollout.engine import Engine, EngineError, SamplingParams
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.rollout.toolcalls import PARSERS, ParsedTurn

CONTINUE_TEXT = "No tool call was found in your last message. Continue working: call a tool, or submit when done."


class Tools(Protocol):
    """The agent's tools (klong_megatron/sandbox/tools.py). ``call`` returns the observation text,
    or an object with ``text`` (or ``content``) and ``done`` (True after a successful submit).
    Bad arguments give an observation; an exception means the sandbox itself failed. A ``schemas()``
    method (``ToolSet.schemas()``: OpenAI function schemas), when present, is given to the chat template
    and stored in the trajectory's ``tools``."""

    def call(self, name: str, arguments: str) -> Any: ...


class Exportable(Protocol):
    def export(self, dest: str | Path) -> Path: ...


def _observation(result: Any) -> tuple[str, bool]:
    if isinstance(result, str):
        return result, False
    text = getattr(result, "text", None)
    text = getattr(result, "content", "") if text is None else text
    return str(text), bool(getattr(result, "done", False) or getattr(result, "submitted", False))


@dataclass
class _Run:
    """Mutable state of one rollout."""

    task: RolloutTask
    tools: Tools
    messages: list[Message]
    ids: list[np.ndarray]
    masks: list[np.ndarray]
    schemas: list[dict[str, Any]] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    gen_s: float = 0.0
    tool_s: float = 0.0
    tokens: int = 0
    context: tuple[str, str] | None = None
    """``Renderer.context_texts`` of the current turn (made for its header, reused for its pieces)."""


class AgentLoop:
    """One agent loop configuration; ``run`` executes one rollout (many may run concurrently)."""

    def __init__(self, engine: Engine, renderer: Renderer, policy: ContextPolicy, cfg: RolloutConfig) -> None:
        self.engine, self.renderer, self.policy, self.cfg = engine, renderer, policy, cfg
        self.parse = PARSERS[cfg.tool_format]
        self.suffix = renderer.assistant_suffix().astype(np.int32)
        self.eot = int(renderer.eot_id)
        self.sampling = SamplingParams(
            max_new_tokens=cfg.sampling.max_new_tokens,
            temperature=cfg.sampling.temperature,
            top_p=cfg.sampling.top_p,
            stop_token_ids=tuple(renderer.stop_ids),
        )
        self.stops = frozenset(int(t) for t in renderer.stop_ids)

    def _header(self, run: _Run) -> np.ndarray:
        run.context = self.renderer.context_texts(run.messages, run.schemas)
        header = self.renderer.generation_prompt(run.messages, run.schemas, run.context).astype(np.int32)
        need = len(header) + self.sampling.max_new_tokens + 1 + len(self.suffix)
        if self.policy.cfg.gen_reserve < need:
            raise ValueError(
                f"policy.gen_reserve={self.policy.cfg.gen_reserve} must hold a whole assistant turn: "
                f"header {len(header)} + max_new_tokens {self.sampling.max_new_tokens} + eot/suffix "
                f"{1 + len(self.suffix)} = {need} tokens"
            )
        return header

    async def run(self, task: RolloutTask, tools: Tools, workdir: Exportable | None = None) -> Trajectory:
        """One rollout of ``task``; never raises for model misbehaviour, only for infrastructure."""
        start = time.monotonic()
        deadline = start + self.cfg.timeout_s
        schemas = tools.schemas() if callable(getattr(tools, "schemas", None)) else None
        rendered = self.renderer.render(task.messages, task.id, tools=schemas)
        run = _Run(task, tools, list(task.messages), [], [], schemas)
        state = self.policy.start(task.id)
        for i, m in enumerate(task.messages):
            self._add(run, state, rendered.message_ids(i), _slice(rendered, i), m)
        header: np.ndarray | None = self._header(run)  # checks gen_reserve before the first request
        reason = "max_turns"
        for _ in range(self.cfg.max_turns):
            if time.monotonic() >= deadline:
                reason = "timed_out"
                break
            header = self._header(run) if header is None else header
            context = np.concatenate([state.context(), header])
            t0 = time.monotonic()
            try:
                gen = await asyncio.wait_for(
                    self.engine.generate(context.tolist(), self.sampling), deadline - time.monotonic()
                )
            except TimeoutError:
                reason = "timed_out"
                break
            except EngineError as e:
                if "context" in str(e):  # the prompt no longer fits the model: end, do not retry
                    reason = "context_full"
                    break
                raise
            gen_s = time.monotonic() - t0
            run.gen_s += gen_s
            run.tokens += len(gen.output_ids)
            parsed = self._assistant_turn(run, state, header, gen, (t0 - start, gen_s), len(context))
            if gen.finish_reason == "abort":
                reason = "aborted"
                break
            done, timed_out = await self._tools(run, state, parsed, deadline)
            if done or timed_out:
                reason = "submitted" if done else "timed_out"
                break
            header = None  # the next turn follows the new observations
        return await self._finish(run, reason, start, workdir)

    # ------------------------------------------------------------------ turn pieces
    def _add(
        self, run: _Run, state: Any, ids: np.ndarray, mask: np.ndarray, msg: Message, tools: tuple[str, ...] = ()
    ) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        pos = np.arange(run.offset, run.offset + len(ids))
        state.add(ids, mask, pos, msg.role, msg.pinned, tools)
        run.offset += len(ids)
        run.ids.append(ids)
        run.masks.append(mask)
        if len(run.ids) > len(run.messages):
            run.messages.append(msg)

    def _assistant_turn(
        self, run: _Run, state: Any, header: np.ndarray, gen: Any, timing: tuple[float, float], context_len: int
    ) -> ParsedTurn:
        out = np.asarray(gen.output_ids, dtype=np.int32)
        appended = not (len(out) and int(out[-1]) in self.stops)
        body = np.concatenate([out, [self.eot]]).astype(np.int32) if appended else out
        ids = np.concatenate([header, body, self.suffix]).astype(np.int32)
        mask = np.concatenate([np.zeros(len(header)), np.ones(len(body)), np.zeros(len(self.suffix))])
        text = self.renderer.tokenizer.decode(body[:-1].tolist(), skip_special_tokens=False)
        parsed = self.parse(text)
        calls = tuple(ToolCall(c.name, c.arguments, f"call_{len(run.steps)}_{k}") for k, c in enumerate(parsed.calls))
        parsed = ParsedTurn(parsed.content, parsed.reasoning, calls, parsed.errors)
        msg = Message("assistant", parsed.content, tool_calls=calls, reasoning=parsed.reasoning)
        structured = self._renders_back(run, msg, body)
        if not structured:
            msg = Message("assistant", text)
        self._add(run, state, ids, mask.astype(np.uint8), msg, tuple(c.name for c in calls))
        run.steps.append(
            {
                "message": len(run.messages) - 1,
                "output_ids": gen.output_ids,
                "logprobs": gen.output_logprobs,
                "finish_reason": gen.finish_reason,
                "appended_eot": appended,
                "weight_version": gen.weight_version,
                "temperature": self.sampling.temperature,  # the trainer scores these tokens at it (rl/windows.py)
                "server": gen.server,
                "t_s": round(timing[0], 4),
                "gen_s": round(timing[1], 4),
                "header_len": len(header),
                "suffix_len": len(self.suffix),
                "context_len": context_len,
                "window": len(state.windows),
                "structured": structured,
                "tool_calls": [c.name for c in calls],
                "parse_errors": list(parsed.errors),
                "tool_s": [],
            }
        )
        return parsed

    def _renders_back(self, run: _Run, msg: Message, body: np.ndarray) -> bool:
        """Whether the chat template renders ``msg`` (after the history) to exactly these tokens."""
        try:
            head, gen, _ = self.renderer.assistant_pieces(run.messages, msg, run.schemas, run.context)
        except ValueError:  # the template refuses the parsed form (e.g. Llama-3.1 and two tool calls)
            return False
        want = body.tolist() if self.renderer.writes_stop else body[:-1].tolist()
        return self.renderer.encode(gen) == want  # the header is the one sent (same context_texts)

    async def _tools(self, run: _Run, state: Any, parsed: ParsedTurn, deadline: float) -> tuple[bool, bool]:
        """Execute the calls; append observations. Returns (submitted, timed_out)."""
        new: list[Message] = []
        done = False
        for err in parsed.errors:
            new.append(Message("tool", f"Error: {err}. No tool was run for this call.", name="error"))
        for call in parsed.calls:
            remaining = min(self.cfg.tool_timeout_s, deadline - time.monotonic())
            t0 = time.monotonic()
            try:
                result = await asyncio.wait_for(asyncio.to_thread(self._call, run, call), max(remaining, 0.001))
            except TimeoutError:
                run.tool_s += time.monotonic() - t0
                return False, True
            dt = time.monotonic() - t0
            run.tool_s += dt
            run.steps[-1]["tool_s"].append(round(dt, 4))
            text, finished = _observation(result)
            new.append(Message("tool", text, tool_call_id=call.id, name=call.name))
            if finished:
                done = True
                break
        if not new and not done:
            new.append(Message("user", CONTINUE_TEXT))
        self._append_rendered(run, state, new)
        return done, False

    def _call(self, run: _Run, call: ToolCall) -> Any:
        try:
            return run.tools.call(call.name, call.arguments)
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            return f"Error: {type(e).__name__}: {e}"

    def _append_rendered(self, run: _Run, state: Any, new: list[Message]) -> None:
        pieces = self.renderer.render_new(run.messages, new, run.schemas)
        for msg, ids in zip(new, pieces, strict=True):
            self._add(run, state, ids, np.zeros(len(ids), np.uint8), msg)

    async def _finish(self, run: _Run, reason: str, start: float, workdir: Exportable | None) -> Trajectory:
        meta = {k: v for k, v in run.task.meta.items() if not k.startswith("_")}
        exported = None
        if workdir is not None:
            dest = Path(self.cfg.export_dir) / _safe(run.task.id)
            exported = str(await asyncio.to_thread(workdir.export, dest))
        meta.update(
            task_id=run.task.task_id,
            sample=run.task.sample,
            finish_reason=reason,
            timed_out=reason == "timed_out",
            turns=len(run.steps),
            tokens=run.tokens,
            duration_s=round(time.monotonic() - start, 4),
            gen_s=round(run.gen_s, 4),
            tool_s=round(run.tool_s, 4),
            workdir=exported,
            steps=run.steps,
            message_ids=[a.tolist() for a in run.ids],
            initial_masks=[m.tolist() for m in run.masks[: len(run.task.messages)]],
        )
        return Trajectory(run.task.id, run.messages, meta, tools=run.schemas)


def rendered_from_record(traj: Trajectory) -> RenderedTrajectory:
    """The exact token stream of a recorded rollout (``meta.message_ids``), as the splitter consumes it.

    Assistant masks: 1 on the engine's output (plus an appended end-of-turn token), 0 on the header
    and suffix; 0 on every other message. Raises ValueError when the record lacks the token fields.
    """
    meta = traj.meta
    if "message_ids" not in meta or "steps" not in meta:
        raise ValueError(f"trajectory {traj.id!r}: meta has no message_ids/steps (not recorded by the agent loop)")
    ids = [np.asarray(m, dtype=np.int32) for m in meta["message_ids"]]
    if len(ids) != len(traj.messages):
        raise ValueError(f"trajectory {traj.id!r}: {len(ids)} message_ids for {len(traj.messages)} messages")
    masks = [np.zeros(len(a), np.uint8) for a in ids]
    tools = [tuple(c.name for c in m.tool_calls) for m in traj.messages]
    for step in meta["steps"]:
        i, h = step["message"], step["header_len"]
        masks[i][h : len(ids[i]) - step["suffix_len"]] = 1
        tools[i] = tuple(step.get("tool_calls", tools[i]))  # the parsed calls, also of unstructured turns
    for i, m in enumerate(meta.get("initial_masks", [])):
        masks[i] = np.asarray(m, dtype=np.uint8)
    lens = np.asarray([len(a) for a in ids], dtype=np.int64)
    ends = np.cumsum(lens)
    return RenderedTrajectory(
        id=traj.id,
        input_ids=np.concatenate(ids).astype(np.int32),
        assistant_mask=np.concatenate(masks),
        spans=np.stack([ends - lens, ends], axis=1),
        roles=[m.role for m in traj.messages],
        pinned=[m.pinned for m in traj.messages],
        tool_names=tools,
    )


def _slice(rt: RenderedTrajectory, i: int) -> np.ndarray:
    s, e = rt.spans[i]
    return rt.assistant_mask[s:e]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def sandbox_rollout_fn(
    agent: AgentLoop,
    pool: Any,
    make_tools: Callable[[Any], Tools],
    setup: Callable[[RolloutTask, Any], None] | None = None,
) -> Callable[[RolloutTask], Awaitable[Trajectory]]:
    """A ``RolloutFn`` for the manager: each rollout takes its own sandbox from ``pool``
    (``acquire()``/``release(sb)``, e.g. ``SandboxPool``), runs ``setup(task, sandbox)`` (copy the
    task's files in), binds ``make_tools(sandbox)`` and runs the agent; the sandbox's work dir is
    exported for the judge and the sandbox is released even when the rollout fails."""

    async def rollout(task: RolloutTask) -> Trajectory:
        sandbox = await asyncio.to_thread(pool.acquire)
        try:
            if setup is not None:
                await asyncio.to_thread(setup, task, sandbox)
            return await agent.run(task, make_tools(sandbox), workdir=sandbox)
        finally:
            await asyncio.to_thread(pool.release, sandbox)

    return rollout

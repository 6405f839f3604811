"""The agent loop end to end: real bubblewrap sandboxes and tools, the tiny model or a scripted policy,
train/inference context consistency, timeouts, and the manager's crash-safe store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from rollout_doubles import ScriptedEngine

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.config.rollout import DevServerConfig, RolloutConfig, SamplingConfig
from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.split import split_trajectory
from klong_megatron.data.trajectory import Message, read_trajectories
from klong_megatron.rollout.agent import AgentLoop, rendered_from_record, sandbox_rollout_fn
from klong_megatron.rollout.devmodel import DevEngine, build_dev_model
from klong_megatron.rollout.manager import RolloutManager, RolloutTask
from klong_megatron.rollout.store import TrajectoryStore
from klong_megatron.rollout.toolcalls import format_glm45, format_hermes, tools_prompt
from klong_megatron.sandbox.pool import SandboxPool
from klong_megatron.sandbox.tools import ToolSet

TOK = load_tokenizer("byte")
RENDERER = Renderer(TOK)


def policy(max_len: int = 4096, overlap: int = 0, keep_full_turns: int | None = None, reserve: int = 320):
    cfg = ContextPolicyConfig(max_len=max_len, overlap=overlap, keep_full_turns=keep_full_turns, gen_reserve=reserve)
    return ContextPolicy.from_renderer(cfg, RENDERER)


def rollout_cfg(tmp_path: Path, **kw) -> RolloutConfig:
    base = dict(sampling=SamplingConfig(max_new_tokens=300), max_turns=12, timeout_s=60, export_dir=str(tmp_path / "x"))
    return RolloutConfig(**{**base, **kw})


def task(i: int = 0, text: str = "Write hello.txt in the work dir, check it, then submit.", full=False) -> RolloutTask:
    tools = tools_prompt(ToolSet.__new__(ToolSet).schemas()) if full else "Tools: bash, write_file, echo, submit."
    system = "You are an agent in a sandbox.\n" + tools
    return RolloutTask("demo", [Message("system", system), Message("user", text)], sample=i)


@pytest.fixture
def pool():
    with SandboxPool(SandboxConfig(backend="bwrap", memory_mb=1024), size=1) as p:
        yield p


@pytest.mark.bwrap
def test_scripted_policy_uses_real_tools_and_submits(tmp_path, pool):
    script = [
        "I will write the file.\n" + format_hermes("write_file", {"file": "/workspace/hello.txt", "content": "hi 42"}),
        format_hermes("bash", {"command": "cat /workspace/hello.txt"}),
        "<tool_call>\n{broken json\n</tool_call>",
        "Let me think about what is left.",
        format_hermes("submit", {"summary": "done"}),
    ]
    engine = ScriptedEngine(TOK, script)
    agent = AgentLoop(engine, RENDERER, policy(max_len=16384), rollout_cfg(tmp_path))
    run = sandbox_rollout_fn(agent, pool, lambda sb: ToolSet(sb, ToolsConfig()))
    traj = asyncio.run(run(task(full=True)))

    m = traj.meta
    assert m["finish_reason"] == "submitted" and m["turns"] == 5 and not m["timed_out"]
    roles = [x.role for x in traj.messages]
    assert roles == ["system", "user"] + ["assistant", "tool"] * 3 + ["assistant", "user", "assistant", "tool"]
    assert traj.messages[2].tool_calls[0].name == "write_file"
    assert "hi 42" in traj.messages[5].content  # cat's output came back from the sandbox
    assert traj.messages[7].name == "error" and "invalid JSON" in traj.messages[7].content
    assert "No tool call" in traj.messages[9].content
    assert traj.messages[11].tool_call_id == traj.messages[10].tool_calls[0].id
    assert (Path(m["workdir"]) / "hello.txt").read_text() == "hi 42"
    for step in m["steps"]:
        assert len(step["output_ids"]) == len(step["logprobs"]) and step["weight_version"] == "scripted-0"
    assert all(len(s["tool_s"]) == len(s["tool_calls"]) for s in m["steps"])


class EchoTools:
    """Deterministic observations of varied length (no sandbox needed for context bookkeeping)."""

    def call(self, name: str, arguments: str) -> str:
        n = json.loads(arguments)["n"]
        return f"output of step {n}: " + ("abcdefghij" * (n % 7 + 1) * 4)


def long_script(k: int, ctx: list[int]) -> str:
    if k % 5 == 4:
        return f"<think>\nstep {k} needs care\n</think>\nChecking." + "\n" + format_hermes("echo", {"n": k})
    return f"Step {k}." + "\n" + format_hermes("echo", {"n": k})


@pytest.mark.parametrize("fmt", ["hermes", "glm45"])
def test_rollout_contexts_are_exactly_the_split_windows(tmp_path, fmt):
    """Train/inference consistency: the context of every turn is the prefix of the training window
    in which that turn is new, for the recorded token stream and for a re-rendering of the messages."""
    pol = policy(max_len=700, overlap=120, keep_full_turns=2, reserve=150)
    if fmt == "glm45":
        script = lambda k, ctx: f"Step {k}.\n" + format_glm45("echo", {"n": k})  # noqa: E731
    else:
        script = long_script
    engine = ScriptedEngine(TOK, script)
    cfg = rollout_cfg(tmp_path, sampling=SamplingConfig(max_new_tokens=120), max_turns=30, tool_format=fmt)
    traj = asyncio.run(AgentLoop(engine, RENDERER, pol, cfg).run(task(), EchoTools()))

    recorded = rendered_from_record(traj)
    rerendered = RENDERER.render(traj)  # what the SFT pipeline would compute from the messages alone
    np.testing.assert_array_equal(recorded.input_ids, rerendered.input_ids)
    np.testing.assert_array_equal(recorded.assistant_mask, rerendered.assistant_mask)
    structured = [s["structured"] for s in traj.meta["steps"]]
    assert all(structured) if fmt == "hermes" else not any(structured)

    windows = split_trajectory(recorded, pol)
    assert len(windows) >= 4, "the test must cross several windows"
    for k, step in enumerate(traj.meta["steps"]):
        (w,) = [w for w in windows if any(seg[0] == step["message"] and seg[1] == "new" for seg in w.segments)]
        start, end = next(seg[2:] for seg in w.segments if seg[0] == step["message"])
        assert w.window_index == step["window"]
        assert engine.contexts[k] == w.input_ids[: start + step["header_len"]].tolist()
        trained = w.input_ids[start:end][w.loss_mask[start:end].astype(bool)]
        assert trained.tolist() == step["output_ids"]  # trained on exactly the sampled tokens


def test_turn_cut_by_max_new_tokens_gets_end_of_turn_and_stays_consistent(tmp_path):
    pol = policy(reserve=64)
    engine = ScriptedEngine(TOK, ["x" * 200, format_hermes("echo", {"n": 1})])
    cfg = rollout_cfg(tmp_path, sampling=SamplingConfig(max_new_tokens=40), max_turns=2)
    traj = asyncio.run(AgentLoop(engine, RENDERER, pol, cfg).run(task(), EchoTools()))
    first = traj.meta["steps"][0]
    assert first["finish_reason"] == "length" and first["appended_eot"]
    np.testing.assert_array_equal(rendered_from_record(traj).input_ids, RENDERER.render(traj).input_ids)


def test_gen_reserve_too_small_for_a_turn_is_named(tmp_path):
    agent = AgentLoop(ScriptedEngine(TOK, []), RENDERER, policy(reserve=50), rollout_cfg(tmp_path))
    with pytest.raises(ValueError, match="gen_reserve"):
        asyncio.run(agent.run(task(), EchoTools()))


@pytest.mark.bwrap
def test_timeout_stops_a_hanging_tool_and_exports_the_work(tmp_path, pool):
    script = [
        format_hermes("write_file", {"file": "/workspace/partial.txt", "content": "half done"}),
        format_hermes("bash", {"command": "sleep 30"}),
    ]
    agent = AgentLoop(ScriptedEngine(TOK, script), RENDERER, policy(), rollout_cfg(tmp_path, timeout_s=2.0))
    # the command's own limit (4 s) only bounds how long the abandoned tool thread lingers
    run = sandbox_rollout_fn(agent, pool, lambda sb: ToolSet(sb, ToolsConfig(command_timeout_s=4)))
    traj = asyncio.run(run(task()))
    assert traj.meta["duration_s"] < 3.5  # the rollout stopped at its 2 s deadline, not when the tool ended
    assert traj.meta["finish_reason"] == "timed_out" and traj.meta["timed_out"]
    assert (Path(traj.meta["workdir"]) / "partial.txt").read_text() == "half done"


@pytest.mark.bwrap
def test_manager_runs_tiny_model_rollouts_in_sandboxes_and_stores_them(tmp_path):
    model, _ = build_dev_model(DevServerConfig(max_context=2048))
    pol = policy(max_len=2048, reserve=80)
    cfg = rollout_cfg(tmp_path, sampling=SamplingConfig(max_new_tokens=24), max_turns=3)
    agent = AgentLoop(DevEngine(model), RENDERER, pol, cfg)
    store = TrajectoryStore(tmp_path / "store.jsonl")
    with SandboxPool(SandboxConfig(backend="bwrap", memory_mb=1024), size=2) as pool:
        fn = sandbox_rollout_fn(agent, pool, lambda sb: ToolSet(sb, ToolsConfig()))
        stats = asyncio.run(RolloutManager(fn, store, concurrency=2, progress=False).run([task(i) for i in range(3)]))
    assert stats.finished == 3 and stats.failed == 0 and stats.turns == 9
    stored = list(read_trajectories(tmp_path / "store.jsonl"))
    assert sorted(t.id for t in stored) == ["demo/0", "demo/1", "demo/2"]
    for t in stored:
        assert t.meta["finish_reason"] == "max_turns" and Path(t.meta["workdir"]).is_dir()
        steps = t.meta["steps"]
        assert all(len(s["output_ids"]) == len(s["logprobs"]) > 0 for s in steps)
        assert all(s["weight_version"] == "0" for s in steps)
        np.testing.assert_array_equal(rendered_from_record(t).input_ids, np.concatenate(t.meta["message_ids"]))

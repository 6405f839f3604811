"""A task a tiny model learns by RL in a few iterations, run through the real RL path (learning tests).

The task: the agent must call ``pick`` with ``{"colour": TARGET}`` as its first tool call (reward 1,
else 0). A warm-up teaches the format with all colours equally often, so the policy starts near
1 / len(COLOURS). Each iteration then runs the project's own pieces end to end, in one process:

    tiny Megatron GPT (Policy) -> HF export -> dev engine (DevModel over the exported weights) ->
    AgentLoop (chat template, hermes tool calls, recorded token ids + log-probs) -> reward ->
    build_rl_windows (ContextPolicy split, group advantages) -> pack_rows -> Policy.update
    (old log-probs, PPO-clip loss on Megatron, optimizer step)

so a sign or alignment error anywhere between the recorded rollout and the optimizer step shows up
as a reward that does not rise (``sign=-1`` negates every reward: the advantages flip, the reward
falls). The tool is a test double that records the call (the far edge). The warm-up is imitation
through the same update: expert windows with advantage 1, one optimizer step per call (ratio 1, so
the gradient is the token log-likelihood's).

Run: ``python tests/integration/rl_learning.py --iterations 8 [--sign -1]`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = ("red", "green", "blue")
TARGET = "blue"
SYSTEM = "You are an agent with one tool, pick(colour). Call it once."
USER = "Pick a colour."


@dataclasses.dataclass
class Settings:
    iterations: int = 8
    sign: float = 1.0
    seed: int = 0
    groups: int = 4
    rollouts: int = 4
    warmup_steps: int = 60
    warmup_lr: float = 1e-2
    lr: float = 5e-3
    loss_agg: str | None = None
    """algo.loss_agg override (None: the default)."""


class PickTools:
    """Test double of the sandbox tool set: records the calls and answers ``ok``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def call(self, name: str, arguments: str) -> str:
        self.calls.append((name, arguments))
        return "ok"


def reward_of(traj: Any) -> float:
    """1.0 when the first tool call of the rollout is pick(colour=TARGET), else 0.0."""
    for m in traj.messages:
        if m.role == "assistant" and m.tool_calls:
            call = m.tool_calls[0]
            try:
                args = json.loads(call.arguments)
            except json.JSONDecodeError:
                return 0.0
            return float(call.name == "pick" and isinstance(args, dict) and args.get("colour") == TARGET)
    return 0.0


def _config(s: Settings) -> Any:
    from klong_megatron.config.data import ContextPolicyConfig, DataConfig
    from klong_megatron.config.grpo import GRPOConfig
    from klong_megatron.config.model import ModelConfig
    from klong_megatron.config.rl import RLConfig, StageConfig
    from klong_megatron.config.rollout import RolloutConfig, SamplingConfig
    from klong_megatron.config.trainer import TrainerConfig

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176,
                        vocab_size=1024, seq_length=192, transformer_impl="local")  # fmt: skip
    trainer = TrainerConfig(lr=s.warmup_lr, min_lr=s.warmup_lr, train_steps=10_000, global_batch_size=64,
                            micro_batch_size=4, clip_grad=1.0, weight_decay=0.0, seed=s.seed)  # fmt: skip
    algo = GRPOConfig(**({"loss_agg": s.loss_agg} if s.loss_agg else {}))
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0)
    return RLConfig(
        model=model, data=DataConfig(tokenizer="demo_bpe", policy=ContextPolicyConfig(max_len=192, gen_reserve=64)),
        trainer=trainer, algo=algo, rollout=RolloutConfig(sampling=sampling, max_turns=1, timeout_s=120.0),
        stages=[StageConfig(timeout_s=120.0)],
    )  # fmt: skip


def _expert_windows(renderer: Any, ctx: Any, n: int) -> list[Any]:
    from klong_megatron.data.split import split_trajectory
    from klong_megatron.data.trajectory import Message, ToolCall
    from klong_megatron.rl.windows import RLWindow

    out = []
    for i in range(n):
        call = ToolCall("pick", json.dumps({"colour": COLOURS[i % len(COLOURS)]}), "call_0")
        msgs = [Message("system", SYSTEM), Message("user", USER), Message("assistant", "Picking.", tool_calls=(call,))]
        for w in split_trajectory(renderer.render(msgs, f"expert/{i}"), ctx):
            lp = np.full(len(w.input_ids), np.nan, np.float32)
            out.append(RLWindow(f"expert/{i}", "expert", w.input_ids, w.loss_mask, lp, 1.0, 0))
    return out


def _set_lr(policy: Any, lr: float) -> None:
    policy.scheduler.max_lr = policy.scheduler.min_lr = lr
    for g in policy.optimizer.param_groups:
        g["max_lr"] = g["min_lr"] = g["lr"] = lr


async def _rollouts(agent: Any, s: Settings, it: int) -> list[Any]:
    from klong_megatron.data.trajectory import Message
    from klong_megatron.rollout.manager import RolloutTask

    trajs = []
    for g in range(s.groups):  # one at a time: the engine's sampling seeds follow the request order
        for k in range(s.rollouts):
            task = RolloutTask(f"it{it}/task{g}", [Message("system", SYSTEM), Message("user", USER)], k)
            trajs.append(await agent.run(task, PickTools()))
    return trajs


def run(s: Settings) -> dict[str, Any]:
    """Warm-up, then ``s.iterations`` RL iterations; returns rewards per iteration and update metrics."""
    import torch

    from klong_megatron.data.context import ContextPolicy
    from klong_megatron.data.render import Renderer, load_tokenizer
    from klong_megatron.rl.policy import Policy
    from klong_megatron.rl.windows import JudgedRollout, build_rl_windows, pack_rows
    from klong_megatron.rollout.agent import AgentLoop
    from klong_megatron.rollout.devmodel import DevEngine, DevModel, HFCausalLM

    torch.set_num_threads(1)
    random.seed(s.seed)
    cfg = _config(s)
    tok = load_tokenizer(cfg.data.tokenizer)
    renderer = Renderer(tok)
    ctx = ContextPolicy.from_renderer(cfg.data.policy, renderer)
    policy = Policy(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seq = cfg.data.policy.max_len
    t0 = time.perf_counter()
    rows = pack_rows(_expert_windows(renderer, ctx, 6), seq, pad)
    for _ in range(s.warmup_steps):
        policy.update(rows)
    _set_lr(policy, s.lr)
    warmup_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="rl_learning_"))
    model = DevModel(HFCausalLM.from_dir(policy.export_hf(work / "v0", tok)))
    agent = AgentLoop(DevEngine(model), renderer, ctx, cfg.rollout)
    rewards, metrics = [], []
    for it in range(s.iterations):
        trajs = asyncio.run(_rollouts(agent, s, it))
        r = [reward_of(t) for t in trajs]
        rewards.append(float(np.mean(r)))
        judged = [JudgedRollout(t, s.sign * x, t.id.rsplit("/", 1)[0]) for t, x in zip(trajs, r, strict=True)]
        windows, _ = build_rl_windows(judged, ctx, mode=cfg.algo.advantage_mode, loss_agg=cfg.algo.loss_agg,
                                      current_version=it)  # fmt: skip
        if windows:
            m = policy.update(pack_rows(windows, seq, pad))
            metrics.append({k: round(v, 4) for k, v in m.items() if k in ("approx_kl", "entropy", "pg_loss")})
        model.load_weights(str(policy.export_hf(work / f"v{it + 1}", tok)), str(it + 1))
    return {"rewards": rewards, "metrics": metrics, "warmup_s": round(warmup_s, 1),
            "total_s": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Settings):
        kind = float if f.type in ("float", float) else int if f.type in ("int", int) else str
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    s = Settings(**vars(ap.parse_args()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(json.dumps(run(s)), flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Dev-server generation throughput for the demo (tiny) model: in-process vs over HTTP.

Baseline: ``DevModel.generate`` called directly (KV-cached sampling). Then the same requests
through ``SGLangEngine`` -> HTTP -> ``klong-devserver`` (in a thread of this process), one at a
time and 4 concurrent (the dev server runs one generation at a time, so concurrency only queues).
Also a no-KV-cache reference (full forward per token) to show what the cache buys. Each mode:
best of 3 runs.

    python benchmarks/rollout_devserver.py [--requests 8] [--prompt 512] [--new 128]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from klong_megatron.config.rollout import DevServerConfig
from klong_megatron.rollout.devmodel import build_dev_model, sample_token
from klong_megatron.rollout.devserver import DevServer
from klong_megatron.rollout.engine import SamplingParams
from klong_megatron.rollout.sglang import SGLangEngine


def no_cache_tokens(model, prompt: list[int], n: int) -> int:
    """Reference: recompute the whole sequence for every new token."""
    ids, gen = list(prompt), torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(n):
            logits = model.lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            ids.append(sample_token(logits, SamplingParams(temperature=1.0), gen)[0])
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (klong-devserver uses 1 for the tiny model)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = build_dev_model(DevServerConfig(max_context=args.prompt + args.new + 8))
    prompt = [(7 * i) % 250 + 3 for i in range(args.prompt)]
    sp = SamplingParams(max_new_tokens=args.new, temperature=1.0, stop_token_ids=())
    model.lm.eos_token_ids = ()  # measure full-length generations
    rows: list[tuple[str, int, float]] = []

    def timed(name: str, fn, repeats: int = 3) -> None:
        """Best of ``repeats`` (the machine may be shared; the minimum is the least disturbed run)."""
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - t0)
        rows.append((name, tokens, best))

    model.generate(prompt, SamplingParams(max_new_tokens=16))  # warm-up (lazy init, allocator)
    bar = tqdm(total=5, desc="benchmark modes")
    timed(
        "in-process (KV cache)", lambda: sum(len(model.generate(prompt, sp).output_ids) for _ in range(args.requests))
    )
    bar.update()
    timed("in-process, no KV cache", lambda: no_cache_tokens(model, prompt, args.new))
    bar.update()
    with DevServer(model, tokenizer=tok) as server:

        async def http(concurrent: int) -> int:
            eng = SGLangEngine([server.url], request_timeout_s=600)
            total = 0
            for _ in range(args.requests // concurrent):
                gens = await asyncio.gather(*(eng.generate(prompt, sp) for _ in range(concurrent)))
                total += sum(len(g.output_ids) for g in gens)
            await eng.close()
            return total

        timed("HTTP, 1 at a time", lambda: asyncio.run(http(1)))
        bar.update()
        timed("HTTP, 4 concurrent", lambda: asyncio.run(http(4)))
        bar.update(2)
    bar.close()
    base = rows[0][1] / rows[0][2]
    table = Table(title=f"dev server, tiny model, prompt {args.prompt}, {args.new} new tokens, CPU")
    for col in ("mode", "tokens", "wall s", "tokens/s", "vs in-process"):
        table.add_column(col, justify="right")
    for name, tokens, wall in rows:
        table.add_row(name, str(tokens), f"{wall:.2f}", f"{tokens / wall:.0f}", f"{tokens / wall / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()

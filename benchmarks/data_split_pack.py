"""Data pipeline benchmark: split + pack throughput, redundancy and packing efficiency.

    python benchmarks/data_split_pack.py [--trajectories 4] [--repeats 3]

1. Throughput of split + pack on one core for ~700-turn trajectories (rendering excluded: it is done
   once per trajectory offline). Target: >= 2M tokens/s.
2. Redundancy (tokens processed / tokens trained) of several policies on the bundled demo set, next
   to the lower bound (every token once + the prefix repeated in each extra window).
3. Packing efficiency (non-pad / total) on the demo set for packed lengths of 1-16 windows.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from klong_megatron.config.data import ContextPolicyConfig  # noqa: E402
from klong_megatron.data.context import ContextPolicy  # noqa: E402
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES, expert_trajectory, make_task  # noqa: E402
from klong_megatron.data.pack import build_sequence, pack_lengths, packing_efficiency  # noqa: E402
from klong_megatron.data.render import Renderer, load_tokenizer  # noqa: E402
from klong_megatron.data.split import SplitStats, split_trajectory  # noqa: E402
from klong_megatron.data.trajectory import read_trajectories  # noqa: E402

DEMO_POLICY = ContextPolicyConfig(max_len=2048, overlap=256, keep_full_turns=4)


def throughput(renderer: Renderer, n: int, repeats: int, console: Console) -> Table:
    trajs = [expert_trajectory(make_task(10_000 + i, 270), seed=i) for i in range(n)]
    rendered = [renderer.render(t) for t in track(trajs, description="render 700-turn trajectories", console=console)]
    turns = sum(t.meta["turns"] for t in trajs) / n
    tokens = sum(len(rt.input_ids) for rt in rendered)
    table = Table(title=f"split + pack, one core, {n} trajectories of ~{turns:.0f} turns ({tokens:,} tokens)")
    for col in ("max_len", "windows", "split s", "pack s", "tokens/s", "target"):
        table.add_column(col, justify="right")
    for max_len in (2048, 8192, 32768):
        policy = ContextPolicy.from_renderer(replace(DEMO_POLICY, max_len=max_len, overlap=max_len // 8), renderer)
        best_split, best_pack = float("inf"), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            windows = [w for rt in rendered for w in split_trajectory(rt, policy)]
            t1 = time.perf_counter()
            bins = pack_lengths([len(w) for w in windows], 4 * max_len)
            for b in bins:
                build_sequence([(windows[i].input_ids, windows[i].loss_mask, "") for i in b], 4 * max_len, 0)
            t2 = time.perf_counter()
            best_split, best_pack = min(best_split, t1 - t0), min(best_pack, t2 - t1)
        rate = tokens / (best_split + best_pack)
        table.add_row(
            f"{max_len}",
            f"{len(windows)}",
            f"{best_split:.3f}",
            f"{best_pack:.3f}",
            f"{rate / 1e6:.2f}M",
            "ok (>= 2M)" if rate >= 2e6 else "MISSED (< 2M)",
        )
    return table


def demo_tables(renderer: Renderer) -> tuple[Table, Table]:
    rendered = [renderer.render(t) for t in read_trajectories(DEMO_TRAJECTORIES)]
    red = Table(title=f"redundancy on the demo set ({len(rendered)} trajectories, max_len=2048)")
    for col in ("policy", "windows", "processed / trained", "lower bound", "ratio to bound", "lost to elision"):
        red.add_column(col, justify="right")
    variants = {
        "overlap 0": replace(DEMO_POLICY, overlap=0, keep_full_turns=None),
        "overlap 256": replace(DEMO_POLICY, keep_full_turns=None),
        "demo: overlap 256, keep 4": DEMO_POLICY,
        "overlap 256, train overlap": replace(DEMO_POLICY, keep_full_turns=None, train_overlap=True),
    }
    demo_windows = []
    for name, cfg in variants.items():
        policy, stats = ContextPolicy.from_renderer(cfg, renderer), SplitStats()
        windows = []
        for rt in rendered:
            ws = split_trajectory(rt, policy)
            stats.add(rt, ws)
            windows += ws
        if cfg == DEMO_POLICY:
            demo_windows = windows
        red.add_row(
            name,
            f"{stats.windows}",
            f"{stats.redundancy:.3f}",
            f"{stats.lower_bound_redundancy:.3f}",
            f"{stats.redundancy / stats.lower_bound_redundancy:.3f}",
            f"{stats.elided_tokens / max(1, stats.assistant_tokens):.2%}",
        )
    pack = Table(title="packing efficiency on the demo set (demo default policy, windows <= 2048 tokens)")
    for col in ("seq_len", "sequences", "non-pad / total", "target"):
        pack.add_column(col, justify="right")
    lengths = [len(w) for w in demo_windows]
    for mult in (1, 2, 4, 8, 16):
        bins = pack_lengths(lengths, 2048 * mult)
        eff = packing_efficiency(lengths, bins, 2048 * mult)
        pack.add_row(f"{2048 * mult}", f"{len(bins)}", f"{eff:.2%}", "ok (>= 97%)" if eff >= 0.97 else "below 97%")
    return red, pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trajectories", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    console = Console()
    renderer = Renderer(load_tokenizer("byte"))
    console.print(throughput(renderer, args.trajectories, args.repeats, console))
    for table in demo_tables(renderer):
        console.print(table)


if __name__ == "__main__":
    main()

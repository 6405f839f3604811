"""Data pipeline benchmark: split + pack throughput, redundancy and packing efficiency.

    python benchmarks/data_split_pack.py [--trajectories 4] [--repeats 3]

1. Throughput of split + pack on one core for ~700-turn trajectories (rendering excluded: it is done
   once per trajectory offline), in rendered tokens per CPU second of this process (``time.process_time``:
   wall time is meaningless on an oversubscribed shared machine). Target: >= 2M tokens/s.
2. Redundancy (tokens processed / tokens trained) of several policies on the bundled demo set, next
   to the lower bound (every token once + the prefix repeated in each extra window).
3. Context policy: redundancy, share of window boundaries with real overlap (the window shares at least
   min(overlap, room) tokens with the previous one, ``split.boundary_overlap``) and share of windows that
   progressive truncation changes, on the demo set and on it with tool outputs of a few hundred tokens,
   for the default, the demo preset and the paper-pinning policy; and the truncation share at each
   preset's own settings (hydra_configs/data/demo.yaml, hydra_configs/context/*.yaml).
4. Packing efficiency (non-pad / total) on the demo set for packed lengths of 1-16 windows.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")

from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from klong_megatron.config import CONFIG_DIR  # noqa: E402
from klong_megatron.config.data import ContextPolicyConfig  # noqa: E402
from klong_megatron.data.context import ContextPolicy  # noqa: E402
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES, expert_trajectory, make_task  # noqa: E402
from klong_megatron.data.pack import build_sequence, pack_lengths, packing_efficiency  # noqa: E402
from klong_megatron.data.render import Renderer, load_tokenizer  # noqa: E402
from klong_megatron.data.split import SplitStats, boundary_overlap, split_trajectory  # noqa: E402
from klong_megatron.data.trajectory import read_trajectories  # noqa: E402

DEMO_POLICY = ContextPolicyConfig(**OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml").policy))
"""The demo data preset: 2048-token windows, overlap 256, keep_full_turns 1, carry_tokens 384."""


def throughput(renderer: Renderer, n: int, repeats: int, console: Console, rendered: list) -> Table:
    trajs = [expert_trajectory(make_task(10_000 + i, 270), seed=i) for i in range(n)]
    rendered += [renderer.render(t) for t in track(trajs, description="render 700-turn trajectories", console=console)]
    turns = sum(t.meta["turns"] for t in trajs) / n
    tokens = sum(len(rt.input_ids) for rt in rendered)
    table = Table(title=f"split + pack, one core, {n} trajectories of ~{turns:.0f} turns ({tokens:,} tokens)")
    for col in ("max_len", "policy", "windows", "split s", "pack s", "tokens/s", "target"):
        table.add_column(col, justify="right")
    for max_len, truncation in [(m, t) for m in (2048, 8192, 32768) for t in (False, True)]:
        cfg = replace(DEMO_POLICY, max_len=max_len, overlap=max_len // 8, keep_full_turns=None, carry_tokens=None)
        if truncation:  # the demo preset's progressive truncation, scaled: keep 1 turn, carry 3/16 of a window
            cfg = replace(cfg, keep_full_turns=1, carry_tokens=max_len * 3 // 16)
        policy = ContextPolicy.from_renderer(cfg, renderer)
        best_split, best_pack = float("inf"), float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            windows = [w for rt in rendered for w in split_trajectory(rt, policy)]
            t1 = time.process_time()
            bins = pack_lengths([len(w) for w in windows], 4 * max_len)
            for b in bins:
                build_sequence([(windows[i].input_ids, windows[i].loss_mask, "") for i in b], 4 * max_len, 0)
            t2 = time.process_time()
            best_split, best_pack = min(best_split, t1 - t0), min(best_pack, t2 - t1)
        rate = tokens / (best_split + best_pack)
        table.add_row(
            f"{max_len}",
            "overlap + truncation" if truncation else f"overlap {cfg.overlap}",
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
        "overlap 0": replace(DEMO_POLICY, overlap=0, keep_full_turns=None, carry_tokens=None),
        "overlap 256": replace(DEMO_POLICY, keep_full_turns=None, carry_tokens=None),
        "demo preset: overlap 256, keep 1, carry 384": DEMO_POLICY,
        "overlap 256, train overlap": replace(DEMO_POLICY, keep_full_turns=None, carry_tokens=None, train_overlap=True),
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


def _long_observations(trajs: list) -> list:
    """The demo trajectories with every tool output grown to a few hundred tokens (a log tail appended)."""
    out = []
    for t in trajs:
        msgs = [
            replace(m, content=m.content + "".join(f"\n[log {k}] step {k}: loss {1 / (k + 2):.4f}" for k in range(16)))
            if m.role == "tool"
            else m
            for m in t.messages
        ]
        out.append(replace(t, messages=msgs))
    return out


def _policy_row(name: str, cfg: ContextPolicyConfig, rendered: list, renderer: Renderer) -> list[str]:
    policy, stats = ContextPolicy.from_renderer(cfg, renderer), SplitStats()
    boundaries = real = changed = windows = 0
    for rt in rendered:
        ws = split_trajectory(rt, policy)
        stats.add(rt, ws)
        windows += len(ws)
        changed += sum(w.excerpted > 0 for w in ws)
        for prev, w in zip(ws, ws[1:], strict=False):
            shared, want = boundary_overlap(rt, prev, w, cfg, len(policy.marker_ids))
            boundaries += 1
            real += shared >= want - len(policy.elision_ids) - 1
    return [
        name,
        f"{windows}",
        f"{stats.redundancy:.3f}",
        f"{real / max(1, boundaries):.1%}",
        f"{changed / max(1, windows):.1%}",
        f"{stats.elided_tokens / max(1, stats.assistant_tokens):.2%}",
    ]


def policy_tables(renderer: Renderer, long_rendered: list) -> tuple[Table, Table]:
    demo = list(read_trajectories(DEMO_TRAJECTORIES))
    sets = {"demo set": demo, "demo set, long tool outputs": _long_observations(demo)}
    policies = {
        "default (overlap 256)": replace(DEMO_POLICY, keep_full_turns=None, carry_tokens=None),
        "demo preset (+ keep 1, carry 384)": DEMO_POLICY,
        "paper pinning (+ pin_reading, prefix <= 768)": replace(DEMO_POLICY, pin_reading=True, max_prefix_tokens=768),
    }
    table = Table(title="context policy at max_len 2048 (share of window boundaries with min(overlap, room) shared)")
    for col in ("trajectories", "policy", "windows", "processed / trained", "real overlap", "truncated", "lost"):
        table.add_column(col, justify="right")
    for set_name, trajs in sets.items():
        rendered = [renderer.render(t) for t in trajs]
        for name, cfg in policies.items():
            table.add_row(set_name, *_policy_row(name, cfg, rendered, renderer))
    presets = {"data/demo.yaml": DEMO_POLICY}
    for path in sorted((CONFIG_DIR / "context").glob("*.yaml")):
        presets[f"context/{path.name}"] = ContextPolicyConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    tokens = sum(len(rt.input_ids) for rt in long_rendered)
    prog = Table(title=f"each preset's own policy on {len(long_rendered)} ~700-turn trajectories ({tokens:,} tokens)")
    for col in ("preset", "max_len", "windows", "processed / trained", "real overlap", "truncated", "lost"):
        prog.add_column(col, justify="right")
    for name, cfg in presets.items():
        row = _policy_row(name, cfg, long_rendered, renderer)
        prog.add_row(row[0], f"{cfg.max_len}", *row[1:])
    return table, prog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trajectories", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    console = Console(width=150)
    renderer = Renderer(load_tokenizer("byte"))
    long_rendered = []
    console.print(throughput(renderer, args.trajectories, args.repeats, console, long_rendered))
    for table in (*demo_tables(renderer), *policy_tables(renderer, long_rendered)):
        console.print(table)


if __name__ == "__main__":
    main()

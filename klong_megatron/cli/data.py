"""``klong-data``: render, split, pack and measure agent trajectories.

    klong-data render --input traj.jsonl --out rendered.jsonl --tokenizer byte
    klong-data split  --input traj.jsonl --out windows.jsonl --max-len 1024 --overlap 128
    klong-data pack   --input windows.jsonl --out packed.jsonl --seq-len 4096
    klong-data stats  [--input traj.jsonl] --max-len 1024 --seq-len 4096   (default: bundled demo set)
    klong-data prepare --input a.jsonl b.jsonl --out prepared/ --max-len 1024 --workers 8
                      (then train with data.prepared=prepared/)

Malformed trajectories stop the command with ``file:line: field ...`` (exit code 2) unless
``--skip-invalid`` is given, which counts and skips them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from klong_megatron.cli._errors import one_line_errors
from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import ContextPolicy, Window
from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES
from klong_megatron.data.pack import build_sequence, pack_lengths, packing_efficiency
from klong_megatron.data.render import Renderer, load_tokenizer, render_all
from klong_megatron.data.split import SplitStats, split_all
from klong_megatron.data.trajectory import ReadStats, Trajectory, read_trajectories, write_jsonl

console = Console(stderr=True)


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-len", type=int, default=1024, help="tokens per window")
    p.add_argument("--overlap", type=int, default=128, help="min tokens of context shared by consecutive windows")
    p.add_argument("--train-overlap", action="store_true", help="train assistant tokens in every window holding them")
    p.add_argument("--keep-full-turns", type=int, default=None, help="excerpt tool outputs older than k turns")
    p.add_argument("--excerpt-tokens", type=int, default=64)
    p.add_argument("--carry-tokens", type=int, default=None, help="carried history (older turns excerpted)")
    p.add_argument("--pin-reading", action="store_true", help="pin the task + the reading before the first write")
    p.add_argument("--prefix-turns", type=int, default=0, help="assistant turns added to the pinned prefix")
    p.add_argument("--max-prefix-tokens", type=int, default=None)
    p.add_argument("--gen-reserve", type=int, default=0, help="tokens kept free for the next generation")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="klong-data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("render", "split", "stats"):
        p = sub.add_parser(name)
        p.add_argument("--input", nargs="+", default=None, help="trajectory JSONL files (stats: default demo set)")
        p.add_argument("--tokenizer", default="byte", help='local HF tokenizer directory or "byte"')
        p.add_argument("--skip-invalid", action="store_true", help="count and skip malformed trajectories")
        if name != "stats":
            p.add_argument("--out", required=True)
        if name != "render":
            _policy_args(p)
        if name == "stats":
            p.add_argument("--seq-len", type=int, default=None, help="packed length (default: max-len)")
    p = sub.add_parser("prepare", help="render + split + pack plan once into a memory-mapped dataset")
    p.add_argument("--input", nargs="+", required=True, help="trajectory JSONL files (one shard each)")
    p.add_argument("--valid-input", nargs="+", default=[], help="held-out trajectory files (else --valid-fraction)")
    p.add_argument("--out", required=True, help="output directory (rerun to resume an interrupted prepare)")
    p.add_argument("--tokenizer", default="byte", help='local HF tokenizer directory or "byte"')
    p.add_argument("--skip-invalid", action="store_true", help="count and skip malformed trajectories")
    p.add_argument("--workers", type=int, default=1, help="worker processes (parallel over input files)")
    p.add_argument("--seq-len", type=int, default=None, help="packed length (default: max-len)")
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    _policy_args(p)
    p = sub.add_parser("pack")
    p.add_argument("--input", nargs="+", required=True, help="window JSONL files from `klong-data split`")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--pad-id", type=int, default=0)
    return ap


def _trajectories(args: argparse.Namespace, read: ReadStats) -> Iterator[Trajectory]:
    files = args.input or [str(DEMO_TRAJECTORIES)]
    yield from track(
        read_trajectories(files, skip_invalid=args.skip_invalid, stats=read),
        description=f"{args.cmd} {', '.join(Path(f).name for f in files)}",
        console=console,
        transient=True,
    )


def _policy(args: argparse.Namespace, renderer: Renderer) -> ContextPolicy:
    cfg = ContextPolicyConfig(
        max_len=args.max_len,
        overlap=args.overlap,
        prefix_turns=args.prefix_turns,
        max_prefix_tokens=args.max_prefix_tokens,
        keep_full_turns=args.keep_full_turns,
        excerpt_tokens=args.excerpt_tokens,
        carry_tokens=args.carry_tokens,
        pin_reading=args.pin_reading,
        gen_reserve=args.gen_reserve,
        train_overlap=args.train_overlap,
    )
    return ContextPolicy.from_renderer(cfg, renderer)


def _stats_table(stats: SplitStats, windows: list[Window], seq_len: int, per_traj: list[int]) -> Table:
    lengths = [len(w) for w in windows]
    bins = pack_lengths(lengths, seq_len)
    t = Table(title="trajectory splitting")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("trajectories", f"{stats.trajectories}"),
        ("tokens (rendered)", f"{stats.tokens_total:,}"),
        ("assistant tokens", f"{stats.assistant_tokens:,}"),
        ("windows", f"{stats.windows:,}"),
        ("windows / trajectory (min/mean/max)", f"{min(per_traj)}/{np.mean(per_traj):.1f}/{max(per_traj)}"),
        ("tokens processed (windows)", f"{stats.window_tokens:,}"),
        ("tokens trained", f"{stats.trained_tokens:,}"),
        ("assistant tokens lost to elision", f"{stats.elided_tokens:,}"),
        ("redundancy (processed / trained)", f"{stats.redundancy:.3f}"),
        ("lower bound (prefix repeated per window)", f"{stats.lower_bound_redundancy:.3f}"),
        (f"packing efficiency (seq_len={seq_len})", f"{packing_efficiency(lengths, bins, seq_len):.2%}"),
        ("packed sequences", f"{len(bins):,}"),
    ]
    for row in rows:
        t.add_row(*row)
    return t


def _prepare(args: argparse.Namespace) -> int:
    from klong_megatron.config.data import DataConfig
    from klong_megatron.prepared.prepare import prepare

    renderer = Renderer(load_tokenizer(args.tokenizer))
    cfg = DataConfig(
        tokenizer=args.tokenizer,
        policy=_policy(args, renderer).cfg,
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction,
        skip_invalid=args.skip_invalid,
        seed=args.seed,
    )
    m, shards = prepare(args.input, cfg, args.out, valid_files=args.valid_input, workers=args.workers)
    c, p = m.counts, m.pack
    console.print(
        f"prepared {c['trajectories']} trajectories -> {c['windows']:,} windows ({c['window_tokens']:,} tokens) "
        f"-> {p['train']['sequences']:,} train / {p['valid']['sequences']:,} held-out sequences of {m.seq_len} "
        f"({p['train']['efficiency']:.2%} non-pad) in {args.out}; shards run {shards['ran']}, "
        f"already done {shards['done_before']}"
    )
    if c.get("skipped"):
        console.print(f"skipped {c['skipped']} invalid trajectories")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cmd == "prepare":
        return _prepare(args)
    if args.cmd == "pack":
        windows = [json.loads(line) for f in args.input for line in open(f) if line.strip()]
        bins = pack_lengths([len(w["input_ids"]) for w in windows], args.seq_len)
        recs = (
            build_sequence(
                [
                    (
                        np.asarray(windows[i]["input_ids"]),
                        np.asarray(windows[i]["loss_mask"]),
                        windows[i]["trajectory_id"],
                    )
                    for i in b
                ],
                args.seq_len,
                args.pad_id,
            )
            for b in bins
        )
        n = write_jsonl(
            args.out, ({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in vars(s).items()} for s in recs)
        )
        eff = packing_efficiency([len(w["input_ids"]) for w in windows], bins, args.seq_len)
        console.print(f"packed {len(windows)} windows into {n} sequences of {args.seq_len} ({eff:.2%} non-pad)")
        return 0
    renderer = Renderer(load_tokenizer(args.tokenizer))
    read = ReadStats()
    rendered = render_all(_trajectories(args, read), renderer, skip_invalid=args.skip_invalid, stats=read)
    if args.cmd == "render":
        n = write_jsonl(
            args.out,
            (
                {k: v for k, v in rt.to_json().items() if k in ("trajectory_id", "input_ids", "assistant_mask")}
                for rt in rendered
            ),
        )
        console.print(f"rendered {n} trajectories -> {args.out}")
    else:
        policy, stats = _policy(args, renderer), SplitStats()
        windows = split_all(rendered, policy, stats)
        if args.cmd == "split":
            n = write_jsonl(args.out, (w.to_json() for w in windows))
            console.print(f"{stats.trajectories} trajectories -> {n} windows -> {args.out}")
        else:
            kept = list(windows)
            per_traj = list(np.unique([w.trajectory_id for w in kept], return_counts=True)[1]) or [0]
            Console().print(_stats_table(stats, kept, args.seq_len or args.max_len, per_traj))
    if read.skipped:
        console.print(f"skipped {read.skipped} invalid trajectories (first: {read.errors[0]})")
    return 0


@one_line_errors("klong-data")
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    sys.exit(run(args))


if __name__ == "__main__":
    main()

"""SFT data at scale: ``klong-data prepare`` throughput, and trainer data start-up in memory vs memory-mapped.

    python benchmarks/sft_data_scale.py [--window-tokens 100e6] [--max-len 4096 --overlap 2048] [--workdir DIR]

1. Generates a corpus of long trajectories (the demo generator at ~700 turns, as in data_split_pack.py) into
   ``--files`` JSONL files in a temp directory (deleted at the end unless ``--workdir`` is given), with enough
   trajectories for ``--window-tokens`` window tokens under the policy.
2. Prepare throughput: a subset (``--subset`` of the files) with 1 and with 2 worker processes; then the whole
   corpus with ``--workers`` processes (wall time, CPU time of the workers, window tokens per second).
3. Data start-up of one rank (a fresh process each; imports excluded): build the data, read one global batch
   of ``--batch`` packed sequences. Memory-mapped (``data.prepared``) on the subset and the whole corpus,
   in memory (``build_sft_datasets``) on the subset (and, with ``--memory-full``, the whole corpus: ~38 bytes
   per window token of RAM and as long as a 1-worker prepare).
   Resident memory = the process's peak RSS minus its RSS after the imports.
4. Extrapolation to ``--target`` window tokens (default 3B: 3,000 trajectories x ~500k tokens x redundancy 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from klong_megatron.config.data import ContextPolicyConfig, DataConfig  # noqa: E402


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _config(args: argparse.Namespace, **extra) -> DataConfig:
    policy = ContextPolicyConfig(max_len=args.max_len, overlap=args.overlap, keep_full_turns=args.keep_full_turns)
    return DataConfig(tokenizer="byte", policy=policy, seq_len=args.max_len, **extra)


def child_startup(args: argparse.Namespace) -> None:
    """(fresh process) build the data of one rank, read one global batch; print a JSON line."""
    import torch  # noqa: F401  imports first (the trainer has them already): they are not the data's start-up
    import transformers  # noqa: F401

    import klong_megatron.prepared.dataset  # noqa: F401  (megatron-core)
    from klong_megatron.sft.data import sft_data

    base = _rss_kb("VmRSS")
    c0 = time.process_time()
    t0 = time.perf_counter()
    cfg = _config(args, prepared=args.child_dir) if args.child_dir else _config(args, train_files=args.child_files)
    data = sft_data(cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    order = data["order"](len(data["train"]), cfg.seed)
    it = order.indices(0)
    batch = data["collate"]([data["train"][next(it)] for _ in range(args.batch)])
    t2 = time.perf_counter()
    out = {"build_s": t1 - t0, "build_cpu_s": c1 - c0, "first_batch_s": t2 - t1}
    out.update(
        rss_mb=(_rss_kb("VmHWM") - base) / 1024, sequences=len(data["train"]), tokens=int(batch["tokens"].numel())
    )
    print(json.dumps(out))


def _startup(args: argparse.Namespace, *, directory: Path | None = None, files: list[Path] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--max-len", str(args.max_len), "--overlap", str(args.overlap),
           "--batch", str(args.batch)]  # fmt: skip
    if args.keep_full_turns is not None:
        cmd += ["--keep-full-turns", str(args.keep_full_turns)]
    cmd += ["--child-dir", str(directory)] if directory else ["--child-files", *map(str, files or [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def generate(args: argparse.Namespace, root: Path, console: Console) -> tuple[list[Path], float]:
    """Write the corpus; returns the files and the estimated window tokens per trajectory."""
    from klong_megatron.data.context import ContextPolicy
    from klong_megatron.data.demo_tasks import expert_trajectory, make_task
    from klong_megatron.data.render import Renderer, load_tokenizer
    from klong_megatron.data.split import split_trajectory

    renderer = Renderer(load_tokenizer("byte"))
    policy = ContextPolicy.from_renderer(_config(args).policy, renderer)
    probe = [expert_trajectory(make_task(10_000 + i, 270), seed=i) for i in range(2)]
    per_traj = sum(sum(len(w) for w in split_trajectory(renderer.render(t), policy)) for t in probe) / 2
    n = math.ceil(args.window_tokens / per_traj * 1.03)
    files = [root / f"corpus-{k:03d}.jsonl" for k in range(args.files)]
    if (root / "corpus.done").exists():
        return files, per_traj
    handles = [open(f, "w") for f in files]
    for i in range(n):
        handles[i % len(files)].write(
            json.dumps(expert_trajectory(make_task(10_000 + i, 270), seed=i).to_json()) + "\n"
        )
    for h in handles:
        h.close()
    (root / "corpus.done").touch()
    size = sum(f.stat().st_size for f in files)
    console.print(
        f"corpus: {n} trajectories (~{per_traj:,.0f} window tokens each), {len(files)} files, {size / 1e6:.0f} MB"
    )
    return files, per_traj


def _prepare(args: argparse.Namespace, files: list[Path], out: Path, workers: int) -> dict:
    from klong_megatron.prepared.prepare import prepare

    saved = out.parent / f"{out.name}.result.json"
    if saved.exists():  # --workdir rerun: keep the measured prepare, redo only what follows
        return json.loads(saved.read_text())
    cpu = lambda who: sum(getattr(resource.getrusage(who), k) for k in ("ru_utime", "ru_stime"))  # noqa: E731
    before = cpu(resource.RUSAGE_CHILDREN), cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    m, shards = prepare([str(f) for f in files], _config(args), out, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    workers_cpu, main_cpu = cpu(resource.RUSAGE_CHILDREN) - before[0], cpu(resource.RUSAGE_SELF) - before[1]
    disk = sum((out / name).stat().st_size for name in m.files)
    result = {"workers": workers, "wall": wall, "cpu": workers_cpu, "main_cpu": main_cpu, "disk": disk, **shards}
    result.update(tokens=m.counts["window_tokens"], eff=m.pack["train"]["efficiency"], trajs=m.counts["trajectories"])
    saved.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window-tokens", type=float, default=100e6)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--overlap", type=int, default=2048)
    ap.add_argument("--keep-full-turns", type=int, default=None)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--subset", type=int, default=8, help="files in the 1-vs-2-worker and small start-up runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-full", action="store_true", help="also build the whole corpus in memory")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", type=float, default=3e9)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-files", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_startup(args)
    console = Console(width=160)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sft_data_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        run(args, root, console)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path, console: Console) -> None:
    files, _ = generate(args, root, console)
    sub = files[: args.subset]
    prep = [_prepare(args, sub, root / f"sub-{w}w", w) for w in (1, 2)]
    console.print(f"subset prepared: {prep}")
    full = _prepare(args, files, root / "full", args.workers)
    console.print(f"full prepared: {full}")
    t = Table(title=f"klong-data prepare (policy max_len {args.max_len}, overlap {args.overlap}; byte tokenizer)")
    cols = ("corpus", "workers", "window tokens", "wall s", "worker CPU s", "main CPU s", "tokens/s (wall)")
    for col in (*cols, "tokens/worker-CPU-s", "speed-up vs 1", "disk bytes/token"):
        t.add_column(col, justify="right")
    full_name = f"full ({full.get('ran', '?')} of {full.get('shards', '?')} shards run here)"
    for name, p in (("subset", prep[0]), ("subset", prep[1]), (full_name, full)):
        rate = p["tokens"] / p["wall"]
        speedup = rate / (prep[0]["tokens"] / prep[0]["wall"])
        cells = [name, str(p["workers"]), f"{p['tokens'] / 1e6:.1f}M", f"{p['wall']:.0f}", f"{p['cpu']:.0f}"]
        cells.append(f"{p['main_cpu']:.0f}")
        if p.get("done_before"):  # resumed: the rates of the part run here are not the corpus's
            cells += ["-", "-", "-"]
        else:
            cells += [f"{rate / 1e3:.0f}k", f"{p['tokens'] / p['cpu'] / 1e3:.0f}k", f"{speedup:.2f}"]
        t.add_row(*cells, f"{p['disk'] / p['tokens']:.2f}")
    console.print(t)
    s = Table(title=f"data start-up of one rank (build + first global batch of {args.batch}), imports excluded")
    for col in (
        "path",
        "window tokens",
        "sequences",
        "build s",
        "build CPU s",
        "first batch s",
        "resident MB",
        "MB/M tokens",
    ):
        s.add_column(col, justify="right")
    rows = [
        ("memory-mapped", prep[0]["tokens"], _startup(args, directory=root / "sub-1w")),
        ("memory-mapped", full["tokens"], _startup(args, directory=root / "full")),
        ("in memory", prep[0]["tokens"], _startup(args, files=sub)),
    ]
    if args.memory_full:
        rows.append(("in memory", full["tokens"], _startup(args, files=files)))
    for name, tokens, r in rows:
        cells = [
            name,
            f"{tokens / 1e6:.1f}M",
            f"{r['sequences']:,}",
            f"{r['build_s']:.2f}",
            f"{r['build_cpu_s']:.2f}",
            f"{r['first_batch_s']:.2f}",
        ]
        s.add_row(*cells, f"{r['rss_mb']:.0f}", f"{r['rss_mb'] / (tokens / 1e6):.1f}")
    console.print(s)
    mem_tokens, mem = rows[-1][1], rows[-1][2]
    per_tok_s, per_tok_b = mem["build_cpu_s"] / mem_tokens, mem["rss_mb"] * 2**20 / mem_tokens
    cpu_rate = prep[1]["tokens"] / prep[1]["cpu"]  # worker processes' CPU: render + split + write
    e = Table(title=f"extrapolated to {args.target / 1e9:.0f}B window tokens (linear in tokens)")
    for col in ("quantity", "value"):
        e.add_column(col, justify="right")
    e.add_row("in-memory start-up per rank (CPU time, one core)", f"{per_tok_s * args.target / 3600:.1f} h")
    e.add_row("in-memory resident per rank", f"{per_tok_b * args.target / 1e9:.0f} GB")
    e.add_row(
        "memory-mapped start-up / resident per rank (measured, flat)",
        f"{rows[1][2]['build_s']:.1f} s / {rows[1][2]['rss_mb']:.0f} MB",
    )
    e.add_row(
        "prepare, worker CPU time (byte tokenizer, this policy)", f"{args.target / cpu_rate / 3600:.1f} core-hours"
    )
    e.add_row("prepare, wall on 16 idle cores", f"{args.target / cpu_rate / 16 / 60:.0f} min")
    e.add_row("prepared data on disk", f"{full['disk'] / full['tokens'] * args.target / 1e9:.0f} GB")
    console.print(e)


if __name__ == "__main__":
    main()

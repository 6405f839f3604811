"""Peak extra memory and time of forward+backward: chunked ``token_logprobs`` vs naive full logits.

Claim (issue "memory-efficient log-probs"): at T=8192, V=32768, H=1024 on CPU the chunked version
needs <= 1/8 of the naive peak extra memory and <= 1.3x its time; on a GPU the same at T=32768,
V=151936, H=4096 in bf16.

Method: every measurement runs in a fresh subprocess (so one variant's freed memory cannot hide the
other's peak). It allocates hidden [T, H], weight [V, H], targets [T], then runs
logprobs/entropy -> (logp * g1 + entropy * g2).sum() -> backward once. "Peak extra" is the peak
resident set size (CPU; ``ru_maxrss``) or ``torch.cuda.max_memory_allocated`` (GPU, after one warm-up
run) minus the value right after the inputs were allocated; it includes the [V, H] weight gradient
both variants produce. On CPU a naive run that would not fit in free memory is skipped (estimated,
to keep the OOM killer away from other processes); on a GPU it is tried and reported as OOM.
Variants alternate round by round so that load from other processes hits both alike. Time: the
best (min) and the median wall time over rounds; the ratio uses the best runs (the least disturbed by
other load, as timeit does). On CPU the process CPU time (all threads) is shown too: it counts the work
done and is far less sensitive than wall time to other processes on a shared machine. The load
average before and after is printed.

    python benchmarks/logprobs_memory.py                      # CPU: V=32768 and V=151936 (if it fits)
    python benchmarks/logprobs_memory.py --device cuda        # GPU: T=32768, V=151936, H=4096, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from klong_megatron.algo.logprobs import naive_token_logprobs, token_logprobs

GIB = 1024**3


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(variant: str, t: int, v: int, h: int, dtype: str, device: str, chunk: int) -> dict:
    """Run one forward+backward in THIS process; return peak extra bytes and seconds."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(t, h, device=device, dtype=dt).mul_(0.5).requires_grad_()
    weight = torch.randn(v, h, device=device, dtype=dt).mul_(h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (t,), device=device)
    g1, g2 = torch.randn(t, device=device), torch.randn(t, device=device)
    cuda = device.startswith("cuda")

    def step() -> None:
        if variant == "naive":
            logp, ent = naive_token_logprobs(hidden, weight, targets)
        else:
            logp, ent = token_logprobs(hidden, weight, targets, chunk_size=chunk)
        ((logp * g1).sum() + (ent * g2).sum()).backward()

    if cuda:  # warm up cuBLAS / the allocator, then measure a clean second run
        step()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = _rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes()
    return {"peak_extra": peak - base, "seconds": seconds, "cpu_seconds": cpu_seconds}


def _naive_estimate(t: int, v: int, h: int, dtype: str) -> int:
    """Rough naive peak extra: ~5 float32 [T, V] buffers (logits, log-softmax, exp, grads) + [V, H] grad."""
    return 5 * t * v * 4 + t * v * torch.finfo(getattr(torch, dtype)).bits // 8 + v * h * 4


def _available_bytes(device: str) -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _run_child(args: argparse.Namespace, variant: str, v: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--T", str(args.T), "--H", str(args.H), "--V", str(v)]
    cmd += ["--dtype", args.dtype, "--device", args.device, "--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        return {"error": tail[0][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--T", type=int, default=None, help="tokens (default 8192 CPU, 32768 GPU)")
    p.add_argument("--H", type=int, default=None, help="hidden size (default 1024 CPU, 4096 GPU)")
    p.add_argument("--V", type=int, nargs="*", default=None, help="vocab sizes (default 32768 151936 CPU)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default 512 CPU, 4096 GPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.T = args.T or (32768 if gpu else 8192)
    args.H = args.H or (4096 if gpu else 1024)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.chunk_size = args.chunk_size or (4096 if gpu else 512)
    vocabs = args.V or ([151936] if gpu else [32768, 151936])
    if args.child:
        try:
            result = measure(args.child, args.T, vocabs[0], args.H, args.dtype, args.device, args.chunk_size)
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
        print(json.dumps(result))
        return
    _report(args, vocabs)


def _report(args: argparse.Namespace, vocabs: list[int]) -> None:
    gpu = args.device.startswith("cuda")
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(title=f"token_logprobs fwd+bwd, T={args.T} H={args.H} {args.dtype} on {args.device}")
    cols = ("V", "variant", "chunk", "peak extra GiB", "mem vs naive", "best s", "median s", "time vs naive")
    cols += () if gpu else ("CPU s", "CPU vs naive")
    console.print(f"load average before: {os.getloadavg()[0]:.2f}")
    for col in cols:
        table.add_column(col, justify="right")
    for v in vocabs:
        variants = ["chunked", "naive"]
        need = _naive_estimate(args.T, v, args.H, args.dtype)
        if not gpu and need > 0.8 * _available_bytes(args.device):  # a GPU OOM is harmless: just try there
            variants = ["chunked"]
            console.print(f"V={v}: naive needs ~{need / GIB:.1f} GiB, more than 80% of what is free; not run")
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        steps = [(r, k) for r in range(args.rounds) for k in variants]
        for _, k in track(steps, description=f"V={v}", console=console):
            runs[k].append(_run_child(args, k, v))
        summary = {}
        for k, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                summary[k] = None
                table.add_row(str(v), k, "", rs[0]["error"], *[""] * (len(cols) - 4))
                continue
            times = [r["seconds"] for r in ok]
            cpu = min(r["cpu_seconds"] for r in ok)
            summary[k] = (max(r["peak_extra"] for r in ok), min(times), statistics.median(times), cpu)
        base = summary.get("naive")
        for k, s in summary.items():
            if s is None:
                continue
            mem_ratio = f"{s[0] / base[0]:.3f}" if base else "n/a"
            time_ratio = f"{s[1] / base[1]:.2f}x" if base else "n/a"
            chunk = str(args.chunk_size) if k == "chunked" else "-"
            row = (str(v), k, chunk, f"{s[0] / GIB:.2f}", mem_ratio, f"{s[1]:.2f}", f"{s[2]:.2f}", time_ratio)
            cpu_ratio = f"{s[3] / base[3]:.2f}x" if base else "n/a"
            table.add_row(*row, *(() if gpu else (f"{s[3]:.2f}", cpu_ratio)))
    console.print(table)
    load = os.getloadavg()[0]
    console.print(f"threads={torch.get_num_threads()} cpus={os.cpu_count()} rounds={args.rounds} load after={load:.2f}")


if __name__ == "__main__":
    main()

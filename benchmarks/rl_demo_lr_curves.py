"""Per-iteration RL curves of the demo at several learning rates (the README's "Why RL degraded" tables).

Runs the RL stages of ``klong-rl experiment=rl_demo`` once per learning rate, every run from the same SFT
model (``init_from_checkpoint``: a finished demo run's ``sft/checkpoints``, so the curves differ only in the
learning rate), with ``rl.health.action=warn`` so a collapse is shown, not rolled back. Then it reads each
run's log (the trainer's ``rl/stage<s>`` metric lines) and ``rl_state.json`` and prints one table per run:
training reward, entropy, submitted fraction, turns, timeout fraction, ``approx_kl`` and ``ratio_max`` per
iteration, the held-out score after each stage and whether a health check tripped.

    python benchmarks/rl_demo_walltime.py --out runs --seeds 0        # a demo run: its SFT model, its 2e-4 curve
    python benchmarks/rl_demo_lr_curves.py --sft runs/seed0/sft/checkpoints --lrs 6e-4 2e-3 --out curves
    python benchmarks/rl_demo_lr_curves.py --logs runs/seed0 curves/lr6e-4   # tables of finished runs only

Limits: one run per learning rate (no seeds); ``--parallel`` runs them at once, which on a small machine
slows rollouts toward their stage timeouts (the ``timeout`` column shows when that happened).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

COLUMNS = ("reward_mean", "entropy", "submitted_frac", "turns", "timeout_frac", "approx_kl", "ratio_max")
_LINE = re.compile(r"rl/stage(\d+)\s+step\s+(\d+)\s+(.*)")
_PAIR = re.compile(r"(\S+) (-?[\d,]*\.?\d+(?:e[+-]?\d+)?|nan|-?inf)")


def run_command(sft: Path, lr: float, out: Path, overrides: list[str]) -> list[str]:
    """The ``klong-rl`` command of one curve: RL stages only, from ``sft``, at learning rate ``lr``."""
    return [sys.executable, "-m", "klong_megatron.cli.rl", "experiment=rl_demo", "rl.sft_warmup=null",
            f"init_from_checkpoint={sft}", f"trainer.lr={lr}", f"trainer.min_lr={lr}", "rl.health.action=warn",
            "rl.eval_initial=false", f"output_dir={out}", f"hydra.run.dir={out}/hydra", *overrides]  # fmt: skip


def parse_log(text: str) -> list[dict[str, float]]:
    """The ``rl/stage<s>`` metric lines of a klong-rl log, one dict per iteration (``stage``, ``step`` + metrics,
    ``health/tripped`` among them when a health check failed)."""
    rows: list[dict[str, float]] = []
    for line in text.splitlines():
        if m := _LINE.search(line):
            row = {k: float(v.replace(",", "")) for k, v in _PAIR.findall(m.group(3))}
            rows.append(row | {"stage": float(m.group(1)), "step": float(m.group(2))})
    return rows


def curve_table(run: Path, title: str) -> Table:
    """One run's per-iteration table (from ``run/run.log`` and ``run/rl_state.json``)."""
    rows = parse_log((run / "run.log").read_text())
    state = json.loads((run / "rl_state.json").read_text()) if (run / "rl_state.json").exists() else {}
    scores = state.get("scores", {})
    table = Table(title=f"{title}: held-out {', '.join(f'{k} {v:.3f}' for k, v in scores.items())}")
    for col in ("iteration", *COLUMNS, "health"):
        table.add_column(col, justify="right")
    seen: dict[int, int] = {}
    for r in rows:
        s = int(r["stage"])
        seen[s] = seen.get(s, -1) + 1
        table.add_row(f"stage {s} it {seen[s]}", *(f"{r[c]:.3f}" if c in r else "" for c in COLUMNS),
                      "tripped" if r.get("health/tripped") else "")  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", type=Path, help="SFT checkpoint dir of a finished demo run (<run>/sft/checkpoints)")
    parser.add_argument("--lrs", type=float, nargs="*", default=[2e-4, 6e-4, 2e-3], help="learning rates")
    parser.add_argument("--out", type=Path, default=Path("lr_curves"), help="one subdir per learning rate")
    parser.add_argument("--parallel", action="store_true", help="run the learning rates at once")
    parser.add_argument("--logs", type=Path, nargs="*", default=[], help="only print tables of these finished runs")
    parser.add_argument("overrides", nargs="*", help="klong-rl overrides (after --)")
    args = parser.parse_args()
    console = Console(width=200)
    if args.logs:
        for run in args.logs:
            console.print(curve_table(run, str(run)))
        return
    if args.sft is None or not args.sft.is_dir():
        sys.exit(f"--sft: not a checkpoint directory: {args.sft}")
    runs = {lr: args.out / f"lr{lr:g}" for lr in args.lrs}
    procs = []
    for lr, out in runs.items():
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "run.log", "w")  # noqa: SIM115 (closed when the process ends)
        procs.append(subprocess.Popen(run_command(args.sft, lr, out, args.overrides), stdout=log, stderr=log))
        if not args.parallel:
            procs[-1].wait()
    for (lr, out), p in zip(runs.items(), procs, strict=True):
        if p.wait() != 0:
            console.print(f"[red]lr {lr:g}: klong-rl exited {p.returncode}; see {out / 'run.log'}[/red]")
        console.print(curve_table(out, f"trainer.lr={lr:g}"))


if __name__ == "__main__":
    main()

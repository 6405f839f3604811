"""Wall time per phase of the RL demo (``klong-rl experiment=rl_demo``), the README's main job.

Runs the demo as a subprocess in a fresh output dir (its log goes to ``<out>/run.log``), then reads the
phases the trainer timed itself (``rl_state.json``: ``wall_s`` per phase, held-out score after each)
and prints one table: each phase's wall time, its share of the whole run, the score it ended with,
plus the total wall time (process start to exit, so start-up is included), the CPU time of the run's
processes (a fairer figure on a shared machine) and the peak RSS. ``--seeds`` runs the demo once per seed
(``trainer.seed``, ``rl.sft_warmup.seed`` and ``data.seed`` = 1234 + seed, ``rl.seed`` = seed) and ends with one
row per seed: score after SFT, after each stage, the RL gain over SFT, the share of RL rollouts that hit their
stage's timeout (a loaded machine slows rollouts into it, which changes what RL sees), wall and CPU time.

    python benchmarks/rl_demo_walltime.py                       # the demo as `make demo` runs it
    python benchmarks/rl_demo_walltime.py --seeds 0 1 2         # the README's three runs
    python benchmarks/rl_demo_walltime.py -- sandbox=docker     # any klong-rl overrides after --
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rl_demo_lr_curves import parse_log  # this folder's sibling script (the RL iterations' metric lines)


def run_demo(out: Path, overrides: list[str]) -> tuple[float, int]:
    """Run the demo into ``out``; (wall seconds, exit code). Shows a live elapsed-time status."""
    cmd = [sys.executable, "-m", "klong_megatron.cli.rl", "experiment=rl_demo", f"output_dir={out}",
           f"hydra.run.dir={out}/hydra", *overrides]  # fmt: skip
    console = Console()
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as log, console.status("") as status:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            phases = json.loads(s.read_text()).get("wall_s", {}) if (s := out / "rl_state.json").exists() else {}
            status.update(f"klong-rl experiment=rl_demo: {time.perf_counter() - t0:.0f} s, phases done: {list(phases)}")
            time.sleep(1.0)
    return time.perf_counter() - t0, proc.returncode


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def seed_overrides(seed: int) -> list[str]:
    """One demo seed: model init, SFT data order, RL task sampling (seed 0 = the preset as it is)."""
    base = 1234 + seed  # the schemas' default seed is 1234
    return [f"trainer.seed={base}", f"rl.sft_warmup.seed={base}", f"data.seed={base}", f"rl.seed={seed}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: a new temporary one)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="run once per seed (subdirs of --out)")
    parser.add_argument("overrides", nargs="*", help="klong-rl overrides (after --)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rl_demo_"))
    if args.seeds is None:
        one_run(out, args.overrides)
        return
    rows = [(seed, *one_run(out / f"seed{seed}", [*seed_overrides(seed), *args.overrides])) for seed in args.seeds]
    table = Table(title="klong-rl experiment=rl_demo per seed: held-out score after each phase")
    labels = [k for k in rows[0][1] if k != "initial"]
    for col in ("seed", *labels, "RL gain over SFT", "RL rollouts timed out", "wall s", "CPU s"):
        table.add_column(col, justify="right")
    for seed, scores, wall, cpu in rows:
        gain = scores[labels[-1]] - scores["sft"] if "sft" in scores else float("nan")
        its = parse_log((out / f"seed{seed}" / "run.log").read_text())  # a loaded machine times rollouts out
        timed_out = sum(r.get("timeout_frac", 0.0) for r in its) / max(len(its), 1)
        table.add_row(str(seed), *(f"{scores.get(k, float('nan')):.3f}" for k in labels), f"{gain:+.3f}",
                      f"{timed_out:.0%}", f"{wall:.0f}", f"{cpu:.0f}")  # fmt: skip
    Console(width=200).print(table)


def one_run(out: Path, overrides: list[str]) -> tuple[dict[str, float], float, float]:
    """Run the demo into ``out`` and print its phase table; returns (scores, wall s, CPU s of the run)."""
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = _cpu_s()
    wall, rc = run_demo(out, overrides)
    cpu = _cpu_s() - cpu0
    if rc != 0:
        sys.exit(f"klong-rl exited {rc}; see {out / 'run.log'}")
    state = json.loads((out / "rl_state.json").read_text())
    phases, scores = state["wall_s"], state["scores"]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    title = (f"klong-rl experiment=rl_demo {' '.join(overrides)}: {wall:.0f} s wall ({wall / 60:.1f} min), "
             f"{cpu:.0f} s CPU, peak RSS {peak_gb:.2f} GiB")  # fmt: skip
    table = Table(title=title)
    for col in ("phase", "wall s", "share of run", "held-out score after"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase, seconds in phases.items():
        label = phase.removeprefix("eval_")
        score = f"{scores[label]:.3f}" if phase.startswith("eval_") and label in scores else ""
        nested = phase.startswith("eval_stage")  # stage<k>'s own time includes its evaluations
        table.add_row(f"  {phase} (within {label.split('_')[0]})" if nested else phase,
                      f"{seconds:.0f}", f"{seconds / wall:.0%}", score)  # fmt: skip
    rest = wall - sum(s for p, s in phases.items() if not p.startswith("eval_stage"))
    table.add_row("start-up, services, rest", f"{rest:.0f}", f"{rest / wall:.0%}", "")
    Console(width=200).print(table)
    return scores, wall, cpu


if __name__ == "__main__":
    main()

"""Wall time per phase of the RL demo (``klong-rl experiment=rl_demo``), the README's main job.

Runs the demo as a subprocess in a fresh output dir (its log goes to ``<out>/run.log``), then reads the
phases the trainer timed itself (``rl_state.json``: ``wall_s`` per phase, held-out score after each)
and prints one table: each phase's wall time, its share of the whole run, the score it ended with,
plus the total wall time (process start to exit, so start-up is included) and the peak RSS.

    python benchmarks/rl_demo_walltime.py                       # the demo as `make demo` runs it
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: a new temporary one)")
    parser.add_argument("overrides", nargs="*", help="klong-rl overrides (after --)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rl_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    wall, rc = run_demo(out, args.overrides)
    if rc != 0:
        sys.exit(f"klong-rl exited {rc}; see {out / 'run.log'}")
    state = json.loads((out / "rl_state.json").read_text())
    phases, scores = state["wall_s"], state["scores"]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    title = f"klong-rl experiment=rl_demo: {wall:.0f} s wall ({wall / 60:.1f} min), peak RSS {peak_gb:.2f} GiB"
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
    Console().print(table)


if __name__ == "__main__":
    main()

"""``klong-judge calibrate``: grade human-graded submissions and report how well the judge agrees.

    klong-judge calibrate DATA_DIR [--papers PAPERS_DIR] [--out report.json] [--preset default]
                          [judge.endpoints=[http://node:30000] judge.model=... ...]

DATA_DIR has PaperBench's JudgeEval layout (``<paper_id>/<n>/submission/`` + ``grading/expected_result.json``);
PAPERS_DIR holds ``<paper_id>/paper.md`` (+ addenda), default ``DATA_DIR/../papers``. Prints pooled accuracy,
macro precision / recall / F1 and the confusion counts, overall and per category, next to PaperBench's reference
F1 figures (klong_megatron/judge/calibrate.py). Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from klong_megatron.cli._errors import report
from klong_megatron.judge.calibrate import REFERENCE, Example, calibration_report, load_examples

console = Console()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="klong-judge calibrate", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    ap.add_argument("data", type=Path, help="JudgeEval directory: <paper_id>/<n>/{submission,grading}")
    ap.add_argument("--papers", type=Path, default=None, help="<paper_id>/paper.md folders (default DATA/../papers)")
    ap.add_argument("--out", type=Path, default=None, help="report JSON (default DATA/calibration.json)")
    ap.add_argument("--preset", default="default", help="judge preset in hydra_configs/judge/")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. judge.endpoints=[http://h:30000]")
    return ap


async def _grade_all(cfg: Any, examples: list[Example], out_dir: Path) -> list[dict[str, float | None]]:
    from klong_megatron.judge.factory import build_judge, prepare_rubric

    judge, pool = build_judge(cfg)
    try:
        async with judge:
            results = await asyncio.gather(
                *(
                    judge.grade(
                        ex.submission,
                        prepare_rubric(ex.rubric, cfg),
                        priority="eval",
                        paper=ex.paper,
                        addendum=ex.addendum,
                        judge_addendum=ex.judge_addendum,
                        out_path=out_dir / f"{ex.id.replace('/', '_')}.grade.json",
                    )  # fmt: skip
                    for ex in examples
                )
            )
    finally:
        if pool is not None:
            await pool.aclose()
    return [{k: g.score if g.valid else None for k, g in r.leaves.items()} for r in results]


def _table(report: dict[str, Any]) -> Table:
    t = Table(title="judge vs human grades (pooled over examples, PaperBench JudgeEval metrics)")
    for col in (
        "category",
        "leaves",
        "human 1s",
        "accuracy",
        "precision",
        "recall",
        "macro-F1",
        "TP/FP/FN/TN",
        "ref F1",
    ):
        t.add_column(col, justify="left" if col == "category" else "right")
    ref = REFERENCE["o3-mini-high (PaperBench paper)"]
    for cat, m in report["metrics"].items():
        t.add_row(
            cat, str(m["n"]), str(m["positives"]), f"{m['accuracy']:.3f}", f"{m['precision']:.3f}",
            f"{m['recall']:.3f}", f"{m['f1']:.3f}", f"{m['tp']}/{m['fp']}/{m['fn']}/{m['tn']}",
            f"{ref[cat]:.3f}" if cat in ref else "",
        )  # fmt: skip
    return t


def main(argv: list[str]) -> int:
    from klong_megatron.cli.judge import load_config

    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides)
        if cfg.max_depth is not None:
            raise ValueError("judge.max_depth must be null for calibration: human grades are per leaf")
        examples = load_examples(args.data, args.papers)
    except (ValueError, FileNotFoundError) as e:
        return report("klong-judge calibrate", e)
    out = args.out or args.data / "calibration.json"
    console.print(f"{len(examples)} human-graded examples: {', '.join(ex.id for ex in examples)}")
    with console.status("grading ..."):
        predictions = asyncio.run(_grade_all(cfg, examples, out.parent / "calibration_grades"))
    result = calibration_report(examples, predictions)
    console.print(_table(result))
    console.print("reference macro-F1 (PaperBench): o3-mini-high 0.827, random 0.504")
    if result["invalid_leaves"]:
        console.print(f"[yellow]{result['invalid_leaves']} leaves could not be graded and are left out[/yellow]")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"report: {out}")
    return 0

"""``klong-judge``: grade one submission directory against a PaperBench rubric and print a per-category table.

    klong-judge SUBMISSION_DIR RUBRIC_JSON|TASK_DIR [--paper paper.md] [--addendum addendum.md]
                [--judge-addendum judge.addendum.md] [--out grade.json] [--preset default|checks_only]
                [judge.endpoints=[http://node:30000] judge.code_only=true ...]
    klong-judge calibrate JUDGE_EVAL_DIR [--papers DIR] [judge.* overrides]   (klong_megatron/cli/judge_calibrate.py)

A TASK_DIR is a PaperBench paper folder: rubric.json, paper.md and, when present, addendum.md and
judge.addendum.md are read from it (explicit --paper/--addendum/--judge-addendum win).

Trailing ``judge.*=value`` arguments are Hydra overrides of the ``judge=`` preset (schema:
klong_megatron/config/judge.py). Per-leaf results go to ``--out`` (default ``SUBMISSION_DIR.grade.json``).
``--dry-run`` validates the config and rubric and prints the rubric's leaf counts without grading.
Exit codes: 0 graded, 2 bad input (rubric, config, paths), 3 graded but some leaves invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from klong_megatron.cli._errors import one_line, one_line_errors, report
from klong_megatron.config.judge import JudgeConfig
from klong_megatron.judge.judge import JudgeResult
from klong_megatron.judge.rubric import CATEGORIES, RubricError, TaskNode, leaf_weights, load_rubric

console = Console()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="klong-judge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("submission", type=Path, help="submission directory (e.g. a sandbox export)")
    ap.add_argument("rubric", type=Path, help="PaperBench rubric.json, or a task folder holding it")
    ap.add_argument("--paper", type=Path, default=None, help="the paper as Markdown")
    ap.add_argument("--addendum", type=Path, default=None, help="addendum Markdown")
    ap.add_argument("--judge-addendum", type=Path, default=None, help="judge-only addendum (judge.addendum.md)")
    ap.add_argument("--out", type=Path, default=None, help="per-leaf JSON (default: SUBMISSION.grade.json)")
    ap.add_argument("--preset", default="default", help="judge preset in hydra_configs/judge/")
    ap.add_argument("--priority", choices=["eval", "train"], default="eval")
    ap.add_argument("--dry-run", action="store_true", help="validate config and rubric, do not grade")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. judge.endpoints=[http://h:30000]")
    return ap


def load_config(preset: str, overrides: list[str]) -> JudgeConfig:
    """Compose ``judge/<preset>`` with ``overrides`` and convert it to a :class:`JudgeConfig`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from klong_megatron.config import CONFIG_DIR
    from klong_megatron.config import judge as judge_schema

    judge_schema.register(ConfigStore.instance())  # only this schema: the others import torch (seconds)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=f"judge/{preset}", overrides=overrides)
    return OmegaConf.to_object(cfg.judge)


def _table(tree: TaskNode, result: JudgeResult) -> Table:
    shares = leaf_weights(tree)
    table = Table(title=f"{result.rubric_id}: score {result.score:.4f}")
    for col in ("category", "leaves", "graded 1", "invalid", "weight share", "score"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat in CATEGORIES:
        leaves = [leaf for leaf in tree.leaves() if leaf.task_category == cat]
        if not leaves:
            continue
        grades = [result.leaves[leaf.id] for leaf in leaves]
        table.add_row(
            cat,
            str(len(leaves)),
            str(sum(g.score == 1.0 for g in grades)),
            str(sum(not g.valid for g in grades)),
            f"{sum(shares[leaf.id] for leaf in leaves):.3f}",
            f"{result.per_category.get(cat, 0.0):.4f}",
        )
    table.add_row("total", str(len(result.leaves)), "", str(len(result.invalid)), "1.000", f"{result.score:.4f}")
    return table


async def _grade(cfg: JudgeConfig, tree: TaskNode, args: argparse.Namespace) -> JudgeResult:
    from klong_megatron.judge.factory import build_judge

    judge, pool = build_judge(cfg)
    paper, addendum, judge_addendum = (
        p.read_text() if p else "" for p in (args.paper, args.addendum, args.judge_addendum)
    )
    try:
        async with judge:
            return await judge.grade(
                args.submission,
                tree,
                priority=args.priority,
                paper=paper,
                addendum=addendum,
                judge_addendum=judge_addendum,
                out_path=args.out,
            )
    finally:
        if pool is not None:
            await pool.aclose()


@one_line_errors("klong-judge")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        from klong_megatron.cli.judge_calibrate import main as calibrate

        return calibrate(argv[1:])
    args = _parser().parse_intermixed_args(argv)
    if args.rubric.is_dir():  # a PaperBench task folder
        task_dir, args.rubric = args.rubric, args.rubric / "rubric.json"
        for name, file in (("paper", "paper.md"), ("addendum", "addendum.md"), ("judge_addendum", "judge.addendum.md")):
            if getattr(args, name) is None and (task_dir / file).is_file():
                setattr(args, name, task_dir / file)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.preset, args.overrides)
        from klong_megatron.judge.factory import prepare_rubric

        tree = prepare_rubric(load_rubric(args.rubric), cfg)
        if cfg.use_llm and cfg.tokenizer:
            from klong_megatron.judge.submission import TokenCounter

            TokenCounter(cfg.tokenizer)  # a missing judge tokenizer is named before anything is graded
        for name in ("paper", "addendum", "judge_addendum"):
            if (p := getattr(args, name)) is not None and not p.is_file():
                raise ValueError(f"--{name.replace('_', '-')}: no such file {str(p)!r}")
        if not args.submission.is_dir():
            raise ValueError(f"submission directory {str(args.submission)!r} does not exist")
    except (RubricError, ValueError, FileNotFoundError) as e:
        return report("klong-judge", e)
    except Exception as e:  # Hydra composition errors name the bad key
        return report("klong-judge", ValueError(f"bad config: {one_line(e)}"))
    counts = Counter(leaf.task_category for leaf in tree.leaves())
    checks = sum(leaf.check is not None for leaf in tree.leaves())
    console.print(f"rubric {tree.id}: {sum(counts.values())} leaves {dict(counts)}, {checks} with check commands")
    if args.dry_run:
        return 0
    with console.status(f"grading {sum(counts.values())} leaves ..."):
        result = asyncio.run(_grade(cfg, tree, args))
    console.print(_table(tree, result))
    out = args.out or args.submission.resolve().parent / f"{args.submission.resolve().name}.grade.json"
    console.print(f"per-leaf results: {out}")
    usage = result.token_usage
    console.print(f"judge calls {usage.get('calls', 0)}, prompt tokens {usage.get('prompt_tokens', 0):,}, "
                  f"completion tokens {usage.get('completion_tokens', 0):,}")  # fmt: skip
    if result.invalid:
        console.print(
            f"[yellow]{len(result.invalid)} leaves could not be graded (left out of the score; "
            f"{result.invalid_frac:.1%} of the rubric's weight): {result.invalid[:10]}"
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``klong-eval``: Hydra app evaluating a model on PaperBench-style task folders (``hydra_configs/eval.yaml``).

    klong-eval tasks=[../data/paperbench_tasks] chat.base_url=https://api.example.com chat.model=NAME \\
        judge.endpoints=[http://JUDGE:30000] samples=3 concurrency=8 time_limit_s=7200
    klong-eval tasks=[DIR] engine=sglang 'rollout.servers=[http://node1:30000]' data.tokenizer=PATH
    klong-eval tasks=[DIR] dry_run=true            # validate the config and every task folder

Each sample: rollout in a fresh sandbox (the paper read-only at /paper) -> reproduce.sh in a clean
sandbox -> judge. Prints per-task and per-category tables (mean +- standard error) and writes
``report.json`` and ``report.html`` to the output dir; rerunning with the same ``output_dir`` skips
finished samples. Exit 0 when every sample was graded, 1 when some failed (the report covers the rest).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from klong_megatron.cli._errors import INPUT_ERRORS, check_hydra_overrides, one_line_errors
from klong_megatron.cli.sft import _run_names
from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.config.eval import EvalConfig


def run(cfg: EvalConfig, output_dir: str | Path, agent: Any = None) -> dict[str, Any]:
    """Evaluate (or, with ``dry_run``, validate the tasks); returns the report summary."""
    from klong_megatron.eval.report import format_table, write_reports
    from klong_megatron.eval.runner import EvalRunner, load_tasks

    if cfg.dry_run:
        tasks = load_tasks(cfg.tasks)
        leaves = sum(len(list(t.rubric.leaves())) for t in tasks)
        print(f"dry run OK: {len(tasks)} tasks ({leaves} rubric leaves) x {cfg.samples} samples, engine {cfg.engine}")
        return {"dry_run": True, "tasks": [t.task_id for t in tasks]}
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = EvalRunner(cfg, out, agent=agent)
    trajs = asyncio.run(runner.run())
    stats = runner.stats_dict()
    summary = write_reports(out, trajs, runner.tasks, {"stats": stats, "engine": cfg.engine})
    print(format_table(summary))
    print(f"{stats['done']} graded now, {stats['skipped']} already done, {stats['failed']} failed; "
          f"report: {out / 'report.html'}")  # fmt: skip
    for err in stats["errors"][:5]:
        print(f"failed: {err}", file=sys.stderr)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@one_line_errors("klong-eval", INPUT_ERRORS)
def _main(dcfg: DictConfig) -> None:
    cfg: EvalConfig = OmegaConf.to_object(dcfg)
    output_dir, _ = _run_names()
    summary = run(cfg, cfg.output_dir or output_dir)
    if summary.get("stats", {}).get("failed"):
        raise SystemExit(1)


@one_line_errors("klong-eval")
def main() -> None:
    register_configs()
    check_hydra_overrides("klong-eval", CONFIG_DIR, "eval")
    _main()


if __name__ == "__main__":
    main()

"""``klong-factory``: Hydra app turning research papers into task folders and teacher SFT data
(``hydra_configs/factory.yaml``; stages in klong_megatron/factory/).

    klong-factory collect.inputs=[papers/] llm.base_url=https://api.example.com llm.model=NAME output_dir=out/f1
    klong-factory output_dir=out/f1 stages=[collect]                      # one stage; rerun: finished work skipped
    klong-factory output_dir=out/f1 collect.arxiv_ids=[2401.01234] filter.llm=true blacklist.addendum=true
    klong-factory output_dir=out/f1 stages=[distil] distil.teacher.base_url=URL distil.judge.endpoints=[URL]

Prints the stage counters and the failures, writes ``report.json`` / ``report.md`` to the output dir; the task
folders are ``<output_dir>/tasks/<paper_id>/`` (read by ``klong-eval tasks=[<output_dir>/tasks]``). Exit 0 when
no paper failed a stage, 1 when some did (each recorded with its reason; the others are finished).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from klong_megatron.cli._errors import INPUT_ERRORS, check_hydra_overrides, one_line_errors
from klong_megatron.cli.sft import _run_names
from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.config.factory import FactoryConfig


def run(cfg: FactoryConfig, output_dir: str) -> dict:
    """Run the configured stages over ``output_dir``; returns the report (factory/pipeline.py)."""
    from klong_megatron.factory.pipeline import Factory

    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = Factory(cfg, output_dir).run()
    for stage, r in report["stages"].items():
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("done", "skipped", "failed"))
        print(f"{stage:>9}: {r.get('done', 0)} done, {r.get('skipped', 0)} already done, "
              f"{r.get('failed', 0)} failed  {extra}")  # fmt: skip
    if report["rubric_table"]:
        print(report["rubric_table"])
    for f in report["failures"][:20]:
        print(f"failed: {f['paper']} ({f['stage']}): {f['error']}", file=sys.stderr)
    print(f"report: {output_dir}/report.md")
    return report


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="factory")
@one_line_errors("klong-factory", INPUT_ERRORS)
def _main(dcfg: DictConfig) -> None:
    cfg: FactoryConfig = OmegaConf.to_object(dcfg)
    output_dir, _ = _run_names()
    if run(cfg, cfg.output_dir or output_dir)["failures"]:
        raise SystemExit(1)


@one_line_errors("klong-factory")
def main() -> None:
    register_configs()
    check_hydra_overrides("klong-factory", CONFIG_DIR, "factory")
    _main()


if __name__ == "__main__":
    main()

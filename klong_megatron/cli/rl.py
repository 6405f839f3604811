"""``klong-rl``: Hydra app for progressive RL (``hydra_configs/rl.yaml``).

    klong-rl experiment=rl_demo                       # CPU demo: SFT warm-up + two RL stages, minutes
    klong-rl experiment=rl_demo logger=wandb          # + W&B (WANDB_MODE=offline works without network)
    klong-rl experiment=rl_demo dry_run=true          # validate the config and the tasks, print the plan
    sbatch --nodes 5 slurm/rl.sbatch experiment=rl_qwen3_8b data.tokenizer=path/to/Qwen3-8B   # cluster

Exit status: 0 when every stage completed; 3 when the collapse / stall detector stopped the run
(``rl.health``, the reason on stderr); 128 + N after signal N (SIGTERM, Ctrl-C), which stops the
run at once (in-flight rollouts are dropped; an update in progress finishes and is saved first) and
stops the servers and sandboxes it started. A run killed or stopped this way and restarted with the
same ``output_dir`` continues at the stage and iteration it reached (rollouts already judged are reused).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from klong_megatron.cli._errors import INPUT_ERRORS, check_hydra_overrides, one_line_errors
from klong_megatron.cli.sft import _run_names, implementation
from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.config.data import ContextPolicyConfig, policy_differences
from klong_megatron.config.rl import RLConfig
from klong_megatron.rl.health import RLHealthError

EXIT_UNHEALTHY = 3


def describe(cfg: RLConfig, world_size: int = 1) -> str:
    """One paragraph: model, layout, stages and rollout volume (the dry-run output); checks the layout."""
    p, r = cfg.trainer.parallel, cfg.rollout
    dp = p.data_parallel_size(world_size)
    ep = f" (EP {p.ep})" if p.ep > 1 else ""
    stages = ", ".join(
        f"{s.timeout_s:g}s x {s.iterations} it x {s.tasks_per_iteration} tasks x {s.rollouts_per_task}"
        for s in cfg.stages
    )
    warm = f"SFT warm-up {cfg.rl.sft_warmup.train_steps} steps; " if cfg.rl.sft_warmup is not None else ""
    return (
        f"model {cfg.model.num_parameters() / 1e6:.1f}M params, world {world_size} = TP {p.tp} x PP {p.pp} x "
        f"CP {p.cp} x DP {dp}{ep}; weight sync {cfg.rl.weight_sync} to {len(r.servers) or 'dev'} server(s) "
        f"(TP {r.server_tp} x PP {r.server_pp} x DP {r.server_dp} each); "
        f"{warm}{len(cfg.stages)} stages ({stages}); "
        f"engine {cfg.rollout.engine}, sandbox {cfg.sandbox.backend}, advantages {cfg.algo.advantage_mode}, "
        f"tasks {cfg.tasks.source}"
    )


def check_warmup_policy(cfg: RLConfig) -> None:
    """Refuse a warm-up checkpoint (``init_from_checkpoint``, a klong-sft run) whose SFT data was split with
    another context policy than the agent's ``data.policy``: read from that run's ``.hydra/config.yaml``."""
    if not cfg.init_from_checkpoint:
        return
    ckpt = Path(cfg.init_from_checkpoint).resolve()
    runs = [d / ".hydra" / "config.yaml" for d in (ckpt, *list(ckpt.parents)[:3])]
    found = next((f for f in runs if f.is_file()), None)
    sft = OmegaConf.select(OmegaConf.load(found), "data.policy") if found else None
    if sft is None:
        return
    known = {k: v for k, v in OmegaConf.to_container(sft, resolve=True).items() if k in asdict(cfg.data.policy)}
    diff = policy_differences(ContextPolicyConfig(**known), cfg.data.policy)
    if diff:
        raise ValueError(
            f"init_from_checkpoint: the warm-up SFT run ({found}) split its data with another context policy than "
            f"the agent's data.policy (SFT != RL): {'; '.join(diff)}; give both runs the model's context=<preset>"
        )


def run(cfg: RLConfig, output_dir: str | Path, run_name: str | None = None) -> dict:
    """Train (or, with ``dry_run``, validate) and return the run's scores."""
    check_warmup_policy(cfg)
    plan = describe(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.dry_run:
        from klong_megatron.rl.tasks import build_task_sets

        train, held = build_task_sets(cfg.tasks)
        print(f"dry run OK: {plan}; {len(train)} training / {len(held)} held-out tasks")
        return {"dry_run": True, "plan": plan}

    from klong_megatron.logging import MetricsLogger
    from klong_megatron.megatron.parallel import destroy_distributed, init_distributed, is_logging_rank
    from klong_megatron.rl.trainer import RLTrainer

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per /generate call otherwise

    init_distributed(cfg.trainer.parallel, cfg.trainer.seed)
    logger = MetricsLogger(cfg.logger, enabled=is_logging_rank(), run_dir=output_dir, config=asdict(cfg),
                           default_name=run_name or cfg.name, default_group=cfg.name)  # fmt: skip
    logger.info(plan)
    logger.info(implementation(cfg.model))
    code = 1
    try:
        summary = RLTrainer(cfg, output_dir, logger).run()
        code = 128 + summary["signal"] if summary.get("signal") else 0
    finally:
        logger.finish(exit_code=code)
        destroy_distributed()
    if summary.get("scores"):
        _print_scores(logger, summary)
    return summary


def _print_scores(logger, summary: dict) -> None:
    """Held-out score after each phase, with the wall time of the phase that led to it."""
    from rich.table import Table

    wall = summary.get("wall_s", {})
    table = Table(title="held-out judge score")
    for col in ("after", "score", "phase wall time"):
        table.add_column(col, justify="left" if col == "after" else "right")
    for label, score in summary["scores"].items():
        phase = wall.get(label, wall.get(f"eval_{label}"))  # sft, stage<k>; else the evaluation itself
        table.add_row(label, f"{score:.3f}", f"{phase:.0f} s" if phase is not None else "")
    logger.console.print(table)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="rl")
@one_line_errors("klong-rl", INPUT_ERRORS)
def _main(dcfg: DictConfig) -> None:
    cfg: RLConfig = OmegaConf.to_object(dcfg)
    output_dir, run_name = _run_names()
    try:
        summary = run(cfg, cfg.output_dir or output_dir, run_name)
    except RLHealthError as e:  # collapse / stall with rl.health.action=stop (or rollbacks used up)
        print(f"klong-rl: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_UNHEALTHY) from None
    if summary.get("signal"):
        raise SystemExit(128 + summary["signal"])


@one_line_errors("klong-rl")
def main() -> None:
    register_configs()
    check_hydra_overrides("klong-rl", CONFIG_DIR, "rl")
    _main()


if __name__ == "__main__":
    main()

"""``klong-sft``: Hydra app for trajectory-splitting SFT (``hydra_configs/sft.yaml``).

    klong-sft experiment=demo                          # tiny model, bundled demo data, CPU, minutes
    klong-sft experiment=demo logger=wandb             # + W&B (WANDB_MODE=offline works without network)
    torchrun --nproc_per_node 2 -m klong_megatron.cli.sft experiment=demo trainer.parallel.tp=2
    klong-sft experiment=demo dry_run=true             # validate config + data, print the plan, exit
    klong-sft -m hydra/launcher=slurm experiment=qwen3-8b trainer.lr=1e-5,3e-5    # sweep: a Slurm job array
    klong-sft -m hydra/launcher=local experiment=demo trainer.lr=1e-3,3e-3        # sweep: local processes

The composed config becomes an ``SFTConfig`` once (``OmegaConf.to_object``); a bad field fails
here with its name. Exit status: 0 when the run completed or stopped by ``exit_after_steps``,
128 + signal number when SIGTERM/SIGINT stopped it (after a checkpoint was saved).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from klong_megatron.cli._errors import INPUT_ERRORS, check_hydra_overrides, one_line_errors
from klong_megatron.config import CONFIG_DIR, register_configs
from klong_megatron.config.model import ModelConfig
from klong_megatron.config.sft import SFTConfig


def _run_names() -> tuple[str, str | None]:
    """(output dir, default W&B run name) from Hydra's runtime, outside Hydra: (cwd, None)."""
    if not HydraConfig.initialized():
        return os.getcwd(), None
    hc = HydraConfig.get()
    name = hc.job.override_dirname or hc.job.name
    if hc.job.get("num") is not None and hc.mode.name == "MULTIRUN":
        name = f"{name}#{hc.job.num}"
    return hc.runtime.output_dir, name


def export_submitit_ranks() -> bool:
    """In a submitit job of several tasks (``hydra/launcher=slurm``), export RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT from the job for ``init_distributed``. True when it did; a no-op under torchrun
    (RANK already set), in a plain process or a one-task job."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def describe(cfg: SFTConfig, world_size: int) -> str:
    """One paragraph: model size, parallel layout and batch plan (the dry-run output)."""
    p = cfg.trainer.parallel
    dp = p.data_parallel_size(world_size)
    per = cfg.trainer.micro_batch_size * dp
    if cfg.trainer.global_batch_size % per:
        raise ValueError(
            f"trainer.global_batch_size ({cfg.trainer.global_batch_size}) must be a multiple of "
            f"micro_batch_size x DP ({cfg.trainer.micro_batch_size} x {dp})"
        )
    seq = cfg.data.seq_len or cfg.data.policy.max_len
    m = cfg.model
    moe = f" ({m.num_parameters(active=True) / 1e6:.1f}M active, {m.num_experts} experts top-{m.moe_router_topk})"
    ep = f" (EP {p.ep})" if p.ep > 1 else ""
    return (
        f"model {m.num_parameters() / 1e6:.1f}M params{moe if m.is_moe else ''}, {m.num_layers} layers, "
        f"hidden {m.hidden_size}; world {world_size} = TP {p.tp} x PP {p.pp} x CP {p.cp} x DP {dp}{ep}; "
        f"global batch {cfg.trainer.global_batch_size} x {seq} tokens "
        f"({cfg.trainer.global_batch_size // per} micro-batches of {cfg.trainer.micro_batch_size} per rank); "
        f"{cfg.trainer.train_steps} steps"
    )


def implementation(model: ModelConfig) -> str:
    """The one console line saying which layer/optimizer implementations run and why."""
    import importlib.util

    import torch

    from klong_megatron.console import implementation_line
    from klong_megatron.megatron.model import HAVE_TE, resolve_impl

    have_apex = importlib.util.find_spec("apex") is not None
    return implementation_line(resolve_impl(model), HAVE_TE, have_apex, torch.cuda.is_available())


def run(cfg: SFTConfig, output_dir: str | Path, run_name: str | None = None) -> dict:
    """Train (or, with ``dry_run``, validate) and return the trainer's summary."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = describe(cfg, world)
    if cfg.dry_run:
        from klong_megatron.sft.data import sft_data

        data = sft_data(cfg.data)
        print(f"dry run OK: {plan}; data: {len(data['train'])} train / {len(data['valid'])} valid packed sequences")
        for row in data["info"].get("blend", []):
            print("blend: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        return {"dry_run": True, "plan": plan}

    from klong_megatron.logging import MetricsLogger
    from klong_megatron.megatron.parallel import destroy_distributed, is_logging_rank
    from klong_megatron.sft.trainer import SFTTrainer

    trainer = SFTTrainer(cfg, output_dir)
    logger = MetricsLogger(
        cfg.logger,
        enabled=is_logging_rank(),
        run_dir=output_dir,
        config=asdict(cfg),
        default_name=run_name or cfg.name,
        default_group=cfg.name,
    )
    logger.info(plan)
    logger.info(implementation(cfg.model))
    code = 1
    try:
        summary = trainer.run(logger)
        code = 0
    finally:
        logger.finish(exit_code=code)
        destroy_distributed()
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sft")
@one_line_errors("klong-sft", INPUT_ERRORS)
def _main(dcfg: DictConfig) -> float | None:
    cfg: SFTConfig = OmegaConf.to_object(dcfg)
    export_submitit_ranks()
    output_dir, run_name = _run_names()
    output_dir = cfg.output_dir or output_dir
    summary = run(cfg, output_dir, run_name)
    if summary.get("signal"):
        sys.exit(128 + summary["signal"])
    return summary.get("metrics", {}).get("loss")


@one_line_errors("klong-sft")
def main() -> None:
    register_configs()
    check_hydra_overrides("klong-sft", CONFIG_DIR, "sft")
    _main()


if __name__ == "__main__":
    main()

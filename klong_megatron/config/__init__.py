"""Dataclass config schemas, one module per component, registered in Hydra's ConfigStore.

YAML files under ``hydra_configs/`` are presets over these schemas. Each group preset starts with
``defaults: [<group>_schema, _self_]`` so that a typo or a wrong type fails with the field's name.
Entry points convert the composed config to objects once (``OmegaConf.to_object``).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

CONFIG_DIR = Path(__file__).resolve().parents[2] / "hydra_configs"

_registered = False


def register_configs() -> None:
    """Store every component schema in the ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    from klong_megatron.config import (
        cluster,
        data,
        factory,
        grpo,
        judge,
        logger,
        model,
        reproduce,
        rl,
        rollout,
        sandbox,
        sft,
        trainer,
    )
    from klong_megatron.config import eval as eval_cfg

    modules = (data, model, trainer, rollout, sandbox, logger, cluster, sft, grpo, judge, reproduce, rl, eval_cfg)
    for module in (*modules, factory):
        module.register(cs)
    _registered = True

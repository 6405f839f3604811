"""RL presets of real models validate at their cluster size; sharded-policy and server-layout checks name
the field (``config/rl.py``)."""

from __future__ import annotations

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.cli.rl import describe

pytestmark = pytest.mark.usefixtures("hydra_configs")
MOE = ["model.num_experts=4", "model.moe_ffn_hidden_size=32"]


def _rl(*overrides: str):
    return OmegaConf.to_object(compose(config_name="rl", overrides=list(overrides)))


@pytest.mark.parametrize(
    ("experiment", "world", "layout", "servers"),
    [
        ("rl_qwen3_8b", 16, "TP 1 x PP 1 x CP 1 x DP 16", "TP 1 x PP 1 x DP 1"),
        ("rl_glm4.5_air", 64, "TP 2 x PP 2 x CP 1 x DP 16 (EP 16)", "TP 4 x PP 1 x DP 1"),
    ],
)
def test_rl_preset_layout_is_valid_at_its_cluster_size(experiment: str, world: int, layout: str, servers: str) -> None:
    cfg = _rl(f"experiment={experiment}", "init_from_hf=/models/x", "data.tokenizer=/models/x")
    assert cfg.cluster.nodes * cfg.cluster.devices_per_node == world
    text = describe(cfg, world)
    assert f"world {world} = {layout};" in text and f"({servers} each)" in text, text


def test_glm_rl_preset_is_the_106b_moe_with_a_broadcast_weight_push() -> None:
    cfg = _rl("experiment=rl_glm4.5_air", "init_from_hf=/models/x", "data.tokenizer=/models/x")
    assert cfg.model.num_parameters() / 1e9 == pytest.approx(106, rel=0.01)
    assert cfg.model.is_moe and not cfg.model.moe_grouped_gemm
    assert cfg.rl.weight_sync == "distributed" and cfg.trainer.bf16
    assert [s.timeout_s for s in cfg.stages] == [7200, 14400, 21600]
    p = cfg.trainer.parallel
    assert cfg.model.num_layers % p.pp == 0 and cfg.model.num_experts % p.ep == 0
    with pytest.raises(ValueError, match="parallel.ep=16"):
        describe(cfg, 32)  # 32 / (tp * pp) = 8 ranks cannot hold EP 16


def test_sharded_policy_and_per_rollout_temperatures_are_accepted() -> None:
    cfg = _rl("experiment=rl_demo", "trainer.parallel.tp=2", "trainer.parallel.pp=2", "algo.temperature=1.0")
    assert cfg.trainer.parallel.model_parallel_size == 4 and cfg.rollout.sampling.temperature == 0.7


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["rl.weight_sync=distributed", "rollout.server_dp=2"], "rollout.server_dp = 1, got 1 / 2"),
        (["rl.weight_sync=distributed", "rollout.server_pp=2"], "rollout.server_pp"),
        (["trainer.parallel.pp=2", *MOE, "model.moe_grouped_gemm=true"], "model.moe_grouped_gemm"),
        (["rollout.server_tp=0"], "server_tp"),
    ],
)  # fmt: skip
def test_unsupported_sharded_layouts_are_refused_by_name(overrides: list[str], field: str) -> None:
    with pytest.raises(Exception, match=field):
        _rl("experiment=rl_demo", *overrides)


def test_disk_weight_sync_takes_any_server_layout() -> None:
    cfg = _rl("experiment=rl_demo", "rollout.server_pp=2", "rollout.server_dp=2")
    assert cfg.rl.weight_sync == "disk"

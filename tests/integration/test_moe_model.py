"""Mixture-of-experts GPT on Megatron-Core, CPU/gloo: build, parameter count, SFT + resume, EP=2 == one process.

The tiny model has GLM-4.5's structure: a dense first layer, then MoE layers with routed experts
(top-2 of 4, sigmoid scores with an aux-loss-free expert bias), a shared expert and half-rotary heads.
CPU runs need ``moe_token_dispatcher=allgather`` (alltoall waits on CUDA events).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sft_driver import tiny_config
from test_sft_parallel import _run
from test_sft_trainer import _train

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

MOE = [
    "model.num_layers=3",
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=32",
    "model.moe_router_topk=2",
    "model.moe_shared_expert_ffn_hidden_size=32",
    "model.moe_first_dense_layers=1",
    "model.moe_router_score=sigmoid",
    "model.moe_router_expert_bias=true",
    "model.moe_token_dispatcher=allgather",
    "model.rotary_percent=0.5",
]


def test_moe_model_has_router_experts_and_the_counted_parameters() -> None:
    cfg = tiny_config(MOE).model
    init_distributed(ParallelConfig(), seed=0)
    try:
        model = build_gpt(cfg)
    finally:
        destroy_distributed()
    names = {n for n, _ in model.named_parameters()}
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names  # dense first layer
    for layer in (1, 2):
        assert f"decoder.layers.{layer}.mlp.router.weight" in names
        assert f"decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight" in names
        assert {f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc2.weight" for e in range(4)} <= names
    assert "decoder.layers.1.mlp.router.expert_bias" in dict(model.named_buffers())
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    per_expert = 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    assert cfg.num_parameters() - cfg.num_parameters(active=True) == 2 * (4 - 2) * per_expert


def test_moe_model_trains_and_resumes_with_the_same_losses(tmp_path: Path) -> None:
    common = [*MOE, "trainer.train_steps=6"]
    full = _train(tmp_path / "full", common)
    assert full["losses"][-1] < full["losses"][0]
    _train(tmp_path / "split", [*common, "trainer.exit_after_steps=3"])
    second = _train(tmp_path / "split", common)  # experts, router and expert bias come back from the checkpoint
    assert second["losses"] == pytest.approx(full["losses"][3:], abs=1e-6)


def test_expert_parallel_two_ranks_match_one_process(tmp_path: Path) -> None:
    one = _run(tmp_path / "one", 1, MOE)
    two = _run(tmp_path / "ep2", 2, [*MOE, "trainer.parallel.ep=2"])
    assert len(two) == len(one) == 4
    assert two == pytest.approx(one, abs=2e-5)


def test_bad_moe_fields_are_named() -> None:
    cfg = tiny_config(MOE).model
    with pytest.raises(ValueError, match="moe_router_topk"):
        dataclasses.replace(cfg, moe_router_topk=5)
    with pytest.raises(ValueError, match="moe_ffn_hidden_size"):
        dataclasses.replace(cfg, moe_ffn_hidden_size=None)
    with pytest.raises(ValueError, match="moe_token_dispatcher=alltoall needs CUDA"):
        init_distributed(ParallelConfig(), seed=0)
        try:
            build_gpt(dataclasses.replace(cfg, moe_token_dispatcher="alltoall"))
        finally:
            destroy_distributed()

"""Config checks of the GPU path: they refuse, with the field named, what would fail (or silently degrade)
on a GPU node: MoE + TP without sequence parallelism, no Transformer Engine on a GPU, a GPU preset without
GPUs, sequences past the native context; presets compose; fusions are on with TE and off without."""

from __future__ import annotations

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config.cluster import ClusterConfig
from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron import model as model_mod
from klong_megatron.megatron.parallel import check_devices

pytestmark = pytest.mark.usefixtures("hydra_configs")
MOE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=64, seq_length=64, num_experts=4,
           moe_ffn_hidden_size=32)  # fmt: skip


def test_moe_with_tensor_parallelism_needs_sequence_parallelism() -> None:
    with pytest.raises(ValueError, match="tp=2 needs trainer.parallel.sequence_parallel=true"):
        ParallelConfig(tp=2).check_model(ModelConfig(**MOE))
    ParallelConfig(tp=2, sequence_parallel=True).check_model(ModelConfig(**MOE))
    ParallelConfig(tp=2).check_model(ModelConfig(**{**MOE, "num_experts": None}))  # dense: fine
    with pytest.raises(Exception, match="sequence_parallel"):
        no_sp = ["experiment=glm4.5-air", "data.tokenizer=x", "trainer.parallel.sequence_parallel=false"]
        OmegaConf.to_object(compose(config_name="sft", overrides=no_sp))


def test_transformer_engine_is_required_on_a_gpu_unless_local_is_chosen() -> None:
    auto = ModelConfig(**{**MOE, "num_experts": None})
    with pytest.raises(ValueError, match="transformer_engine is not importable on this GPU node"):
        model_mod.resolve_impl(auto, have_te=False, on_gpu=True)
    local = ModelConfig(**{**MOE, "num_experts": None, "transformer_impl": "local"})
    assert model_mod.resolve_impl(local, have_te=False, on_gpu=True) == "local"  # the explicit waiver
    assert model_mod.resolve_impl(auto, have_te=False, on_gpu=False) == "local"  # CPU: the compat path
    assert model_mod.resolve_impl(auto, have_te=True, on_gpu=True) == "te"


def test_a_gpu_cluster_preset_refuses_to_start_without_gpus() -> None:
    h100 = OmegaConf.to_object(compose(config_name="sft", overrides=["cluster=h100"])).cluster
    assert h100.require_gpus
    with pytest.raises(RuntimeError, match="cluster=h100 expects GPUs"):
        check_devices(h100, cuda_available=False)
    check_devices(h100, cuda_available=True)
    check_devices(ClusterConfig(), cuda_available=False)  # cluster=local runs anywhere


def test_fusions_are_on_with_te_and_rope_fusion_stays_off_under_yarn() -> None:
    dense = ModelConfig(**{**MOE, "num_experts": None})
    on = model_mod.fusion_fields(dense, te=True, have_apex_grad_accum=True)
    assert all(on.values())
    assert not any(model_mod.fusion_fields(dense, te=False).values())
    assert not model_mod.fusion_fields(dense, te=True, have_apex_grad_accum=False)["gradient_accumulation_fusion"]
    yarn = ModelConfig(**{**MOE, "num_experts": None, "native_context": 32, "rope_scaling": "yarn",
                          "rope_scaling_factor": 2.0})  # fmt: skip
    assert not model_mod.fusion_fields(yarn, te=True, have_apex_grad_accum=True)["apply_rope_fusion"]


def test_qwen3_8b_sft_and_rl_presets_train_within_the_native_context() -> None:
    sft = OmegaConf.to_object(compose(config_name="sft", overrides=["experiment=qwen3-8b", "data.tokenizer=x"]))
    assert sft.data.policy.max_len <= sft.model.context_limit() == 32768
    long = ["experiment=qwen3-8b", "data.tokenizer=x", "model.seq_length=65536", "data.policy.max_len=65536"]
    with pytest.raises(Exception, match=r"65536\).*native context model.native_context \(32768\)"):
        OmegaConf.to_object(compose(config_name="sft", overrides=long))
    yarn = OmegaConf.to_object(
        compose(config_name="sft", overrides=[*long, "model.rope_scaling=yarn", "model.rope_scaling_factor=2"])
    )
    assert yarn.model.context_limit() == 65536


@pytest.mark.parametrize("preset", ["qwen3-8b", "glm4.5-air", "qwen2.5-32b"])
def test_gpu_presets_overlap_communication_and_save_in_parallel_in_the_background(preset: str) -> None:
    from klong_megatron.megatron.training import ddp_config

    cfg = OmegaConf.to_object(compose(config_name="sft", overrides=[f"experiment={preset}", "data.tokenizer=x"]))
    ddp = ddp_config(cfg.trainer.parallel, on_gpu=True)
    assert ddp.use_distributed_optimizer and ddp.overlap_grad_reduce and ddp.overlap_param_gather
    assert cfg.trainer.async_save and cfg.trainer.fully_parallel_save
    explicit = ddp_config(cfg.trainer.parallel, on_gpu=False)  # set in the preset, so not left to the device
    assert explicit.overlap_grad_reduce and explicit.overlap_param_gather


def test_overlap_defaults_follow_the_device_and_param_gather_needs_the_distributed_optimizer() -> None:
    from klong_megatron.megatron.training import ddp_config

    cpu = ddp_config(ParallelConfig(use_distributed_optimizer=True), on_gpu=False)
    assert not cpu.overlap_grad_reduce and not cpu.overlap_param_gather
    gpu = ddp_config(ParallelConfig(use_distributed_optimizer=True), on_gpu=True)
    assert gpu.overlap_grad_reduce and gpu.overlap_param_gather
    assert not ddp_config(ParallelConfig(), on_gpu=True).overlap_param_gather  # no distributed optimizer
    with pytest.raises(ValueError, match="parallel.overlap_param_gather needs parallel.use_distributed_optimizer"):
        ParallelConfig(overlap_param_gather=True)

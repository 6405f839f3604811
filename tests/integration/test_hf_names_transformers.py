"""The mapping meets transformers' own models (an artifact nobody here wrote): for Llama, Qwen2, Qwen3,
Qwen3-MoE and GLM-4.5, the HF tensors that ``hf_map`` reads for every Megatron parameter are exactly the
state dict of ``AutoModelForCausalLM.from_config`` (transformers 5: experts fused in memory), and each converted
tensor has the Megatron parameter's shape. Both models are built on the meta device (no memory, no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.convert import meta_model
from klong_megatron.megatron.hf import model_config_from_hf
from klong_megatron.megatron.hf_map import exported_names, group_to_hf, group_to_megatron, hf_group
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=100, tie_word_embeddings=False, max_position_embeddings=64)  # fmt: skip
MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2, norm_topk_prob=True)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {**MOE, "num_experts": 4, "mlp_only_layers": [0]},
    "glm4_moe": {
        **MOE,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "attention_bias": True,
    },  # fmt: skip
}


@pytest.fixture(scope="module", autouse=True)
def _one_process():
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mapping_reads_exactly_transformers_tensors_with_megatron_shapes(family, tmp_path):
    arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "glm4_moe": "Glm4Moe"}[
        family
    ]
    config = AutoConfig.for_model(family, **SHAPE, **FAMILIES[family], architectures=[f"{arch}ForCausalLM"])
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)).state_dict()
    cfg = model_config_from_hf(tmp_path)
    params = dict(meta_model(cfg).state_dict())
    names = exported_names(params, cfg)
    read: set[str] = set()
    for n in names:
        g = hf_group(n, cfg, params, hf)
        read.update(g.hf)
        assert group_to_megatron(g, hf, cfg).shape == params[n].shape, n
    assert read == set(hf)
    if not cfg.is_moe:  # export: the same names and shapes back (MoE exports per-expert names, see hf_map)
        out = {k: v for n in names for k, v in group_to_hf(hf_group(n, cfg, params), params[n], cfg).items()}
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in hf.items()}

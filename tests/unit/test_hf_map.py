"""The per-parameter HF <-> Megatron mapping (``megatron/hf_map.py``): each group kind converts both ways exactly,
and what has no counterpart fails naming the parameter."""

from __future__ import annotations

import pytest
import torch

from klong_megatron.config.model import ModelConfig
from klong_megatron.megatron.hf_map import group_to_hf, group_to_megatron, hf_group

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
             ffn_hidden_size=48, vocab_size=100, seq_length=64)  # fmt: skip
DENSE = ModelConfig(**SHAPE, qkv_bias=True, untie_embeddings=True)
GLM = ModelConfig(**SHAPE, num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2, moe_router_score="sigmoid",
                  moe_shared_expert_ffn_hidden_size=16, moe_first_dense_layers=1)  # fmt: skip
L = "decoder.layers.1."


def _hf_tensors(names: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {n: torch.randn(shapes[n.rsplit(".", 2)[-2]]) for n in names}


@pytest.mark.parametrize(
    ("name", "kind", "shapes"),
    [
        (f"{L}self_attention.linear_qkv.weight", "qkv", {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32)}),
        (f"{L}self_attention.linear_qkv.bias", "qkv", {"q_proj": (32,), "k_proj": (16,), "v_proj": (16,)}),
        (f"{L}mlp.linear_fc1.weight", "cat", {"gate_proj": (48, 32), "up_proj": (48, 32)}),
        (f"{L}self_attention.linear_proj.weight", "same", {"o_proj": (32, 32)}),
        ("output_layer.weight", "vocab", {"lm_head": (100, 32)}),
    ],
)
def test_dense_group_round_trips_exactly(name, kind, shapes):
    names = {name, f"{L}input_layernorm.weight"}
    g = hf_group(name, DENSE, names)
    assert g.kind == kind
    hf = _hf_tensors(g.hf, shapes)
    meg = group_to_megatron(g, hf, DENSE)
    back = group_to_hf(g, meg, DENSE)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    if kind == "vocab":  # padded with zero rows to a multiple of make_vocab_size_divisible_by (128)
        assert meg.shape == (128, 32) and not meg[100:].any()


def test_qkv_is_megatrons_grouped_order():
    g = hf_group(f"{L}self_attention.linear_qkv.weight", DENSE, set())
    q, k, v = (torch.full((n, 1), float(i)) for i, n in enumerate((32, 16, 16)))
    fused = group_to_megatron(g, dict(zip(g.hf, (q, k, v), strict=True)), DENSE).flatten()
    group = [0.0] * 16 + [1.0] * 8 + [2.0] * 8  # per KV group: its 2 query heads (2 x 8), then k (8), then v (8)
    assert fused.tolist() == group * 2


def test_tied_hf_head_and_fused_experts_are_read_on_import():
    hf = {"model.embed_tokens.weight": torch.randn(100, 32),
          "model.layers.1.mlp.experts.gate_up_proj": torch.randn(4, 32, 32),
          "model.layers.1.mlp.experts.down_proj": torch.randn(4, 32, 16)}  # fmt: skip
    names = {"output_layer.weight", f"{L}mlp.experts.local_experts.2.linear_fc1.weight"}
    head = group_to_megatron(hf_group("output_layer.weight", GLM, names, hf), hf, GLM)
    assert torch.equal(head[:100], hf["model.embed_tokens.weight"])
    fc1 = hf_group(f"{L}mlp.experts.local_experts.2.linear_fc1.weight", GLM, names, hf)
    fc2 = hf_group(f"{L}mlp.experts.linear_fc2.weight2", GLM, names, hf)  # TE grouped-GEMM name
    assert torch.equal(group_to_megatron(fc1, hf, GLM), hf["model.layers.1.mlp.experts.gate_up_proj"][2])
    assert torch.equal(group_to_megatron(fc2, hf, GLM), hf["model.layers.1.mlp.experts.down_proj"][2])
    per_expert = group_to_hf(
        hf_group(f"{L}mlp.experts.local_experts.2.linear_fc1.weight", GLM, names), torch.ones(32, 32), GLM
    )
    assert set(per_expert) == {
        "model.layers.1.mlp.experts.2.gate_proj.weight",
        "model.layers.1.mlp.experts.2.up_proj.weight",
    }


def test_glm_router_without_expert_bias_exports_zero_bias_and_refuses_one_on_import():
    g = hf_group(f"{L}mlp.router.weight", GLM, {f"{L}mlp.router.weight"})
    out = group_to_hf(g, torch.randn(4, 32), GLM)
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].tolist() == [0.0] * 4
    hf = {
        "model.layers.1.mlp.gate.weight": torch.randn(4, 32),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.ones(4),
    }
    with pytest.raises(KeyError, match="moe_router_expert_bias"):
        hf_group(f"{L}mlp.router.weight", GLM, {f"{L}mlp.router.weight"}, hf)


def test_names_without_counterpart_fail_naming_them():
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.mystery.weight"):
        hf_group("decoder.layers.0.mlp.mystery.weight", DENSE, set())
    with pytest.raises(ValueError, match="gated shared expert"):
        hf_group(f"{L}mlp.shared_experts.gate_weight", GLM, set())
    g = hf_group(f"{L}mlp.linear_fc1.weight", DENSE, set())
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        group_to_megatron(g, {"model.layers.1.mlp.gate_proj.weight": torch.zeros(48, 32)}, DENSE)

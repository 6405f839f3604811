"""HF Qwen3-MoE / GLM-4.5 safetensors <-> Megatron MoE GPT: config fields, logits match transformers (fp32),
exact export round trip, exported config loads back in transformers as the same model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.hf import (
    hf_config,
    hf_to_megatron,
    load_hf_weights,
    model_config_from_hf,
    save_hf_weights,
)
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
              moe_intermediate_size=32, num_experts_per_tok=2, norm_topk_prob=True)  # fmt: skip
FAMILIES = {
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {"num_experts": 4, "mlp_only_layers": [0], "rope_theta": 1000000.0}),
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM,
                 {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                  "routed_scaling_factor": 2.5, "partial_rotary_factor": 0.5, "attention_bias": True,
                  "use_qk_norm": True, "n_group": 1, "topk_group": 1, "rope_theta": 1000000.0}),
}  # fmt: skip
EXPECTED = {  # ModelConfig fields model_config_from_hf must produce
    "qwen3_moe": dict(num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_shared_expert_ffn_hidden_size=None,
                      moe_first_dense_layers=1, moe_router_score="softmax", moe_router_expert_bias=False,
                      moe_routed_scaling=1.0, rotary_percent=1.0, qkv_bias=False, qk_layernorm=True,
                      rotary_base=1000000, ffn_hidden_size=96, kv_channels=16, num_layers=3),
    "glm4_moe": dict(num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_shared_expert_ffn_hidden_size=32,
                     moe_first_dense_layers=1, moe_router_score="sigmoid", moe_router_expert_bias=True,
                     moe_routed_scaling=2.5, rotary_percent=0.5, qkv_bias=True, qk_layernorm=True,
                     rotary_base=1000000, ffn_hidden_size=96, kv_channels=16, num_layers=3),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def _tiny_hf(family: str, tmp: Path) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # random norms/biases/router, so a swapped mapping cannot pass by accident
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            elif name.endswith(("gate.weight", "gate_up_proj", "down_proj")):
                p.normal_(0.0, 0.2)  # zero-initialised router; experts distinct enough to tell apart
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    hf.save_pretrained(tmp / "hf", safe_serialization=True)
    return tmp / "hf", hf


def _build(hf_dir: Path):
    cfg = dataclasses.replace(model_config_from_hf(hf_dir), moe_token_dispatcher="allgather")
    model = build_gpt(cfg).eval()
    load_hf_weights(model, hf_dir, cfg)
    return cfg, model


def _logits(model, hf, tokens):
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    with torch.no_grad():
        return model(tokens, positions, mask)[..., :VOCAB], hf(tokens).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_from_hf_has_moe_fields(tmp_path: Path, family: str) -> None:
    hf_dir, _ = _tiny_hf(family, tmp_path)
    cfg = model_config_from_hf(hf_dir)
    assert cfg.is_moe and cfg.moe_layer_pattern() == [0, 1, 1]
    assert {k: getattr(cfg, k) for k in EXPECTED[family]} == EXPECTED[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_moe_logits_match_transformers(tmp_path: Path, family: str) -> None:
    hf_dir, hf = _tiny_hf(family, tmp_path)
    _, model = _build(hf_dir)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, ref = _logits(model, hf, tokens)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_export_round_trip_is_exact(tmp_path: Path, family: str) -> None:
    hf_dir, hf = _tiny_hf(family, tmp_path)
    cfg, model = _build(hf_dir)
    out = save_hf_weights(model, cfg, tmp_path / "export", hf_dir)
    original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    # our own config.json (not the copied one) loads back in transformers as the same architecture and model
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(hf)
    back = model_config_from_hf(out)
    assert dataclasses.replace(back, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
                               moe_token_dispatcher=cfg.moe_token_dispatcher) == cfg  # fmt: skip
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, atol=0, rtol=0)


def test_glm_mtp_layers_are_skipped(tmp_path: Path) -> None:
    """GLM checkpoints hold num_nextn_predict_layers MTP layers as model.layers.{num_hidden_layers}: ignored."""
    hf_dir, hf = _tiny_hf("glm4_moe", tmp_path)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    mtp = {
        f"model.layers.3.{k.split('.', 3)[3]}": v.clone() for k, v in tensors.items() if k.startswith("model.layers.2.")
    }
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    save_file({**tensors, **mtp}, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg, model = _build(hf_dir)
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    ours, ref = _logits(model, hf, tokens)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    out = save_hf_weights(model, cfg, tmp_path / "export", hf_dir)
    assert load_file(str(out / "model.safetensors")).keys() == tensors.keys()


def test_unsupported_moe_routing_is_named(tmp_path: Path) -> None:
    hf_dir, _ = _tiny_hf("glm4_moe", tmp_path)
    c = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**c, "n_group": 2, "topk_group": 1}))
    with pytest.raises(ValueError, match="group-limited routing"):
        model_config_from_hf(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps({**c, "architectures": ["Qwen3MoeForCausalLM"],
                                                    "num_experts": 4, "norm_topk_prob": False}))  # fmt: skip
    with pytest.raises(ValueError, match="norm_topk_prob"):
        model_config_from_hf(hf_dir)


def test_fused_expert_layout_imports_the_same(tmp_path: Path) -> None:
    """Experts stored as transformers' in-memory 3-D tensors (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    hf_dir, _ = _tiny_hf("qwen3_moe", tmp_path)
    cfg = dataclasses.replace(model_config_from_hf(hf_dir), moe_token_dispatcher="allgather")
    names = {k for k in build_gpt(cfg).state_dict() if not k.endswith("_extra_state")}
    per_expert = load_file(str(hf_dir / "model.safetensors"))
    fused = {k: v for k, v in per_expert.items() if ".mlp.experts." not in k}
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts."
        fused[f"{p}gate_up_proj"] = torch.stack(
            [
                torch.cat([per_expert[f"{p}{e}.gate_proj.weight"], per_expert[f"{p}{e}.up_proj.weight"]])
                for e in range(4)
            ]
        )
        fused[f"{p}down_proj"] = torch.stack([per_expert[f"{p}{e}.down_proj.weight"] for e in range(4)])
    a, b = hf_to_megatron(per_expert, cfg, names), hf_to_megatron(fused, cfg, names)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

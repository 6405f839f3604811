"""HF Llama/Qwen2/Qwen3 safetensors <-> Megatron GPT: exact round trip, logits match transformers (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.hf import load_hf_weights, model_config_from_hf, save_hf_weights
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)  # fmt: skip
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_theta": 10000.0}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"rope_theta": 1000000.0}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16, "rope_theta": 1000000.0}),
}


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def _tiny_hf(family: str, tmp: Path, tied: bool = False) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**COMMON, **extra, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # random norms/biases, so a swapped mapping cannot pass by accident
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    hf.save_pretrained(tmp / "hf", safe_serialization=True)
    return tmp / "hf", hf


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False)])
def test_imported_model_logits_match_transformers(tmp_path: Path, family: str, tied: bool) -> None:
    hf_dir, hf = _tiny_hf(family, tmp_path, tied)
    cfg = model_config_from_hf(hf_dir)
    model = build_gpt(cfg).eval()
    load_hf_weights(model, hf_dir, cfg)
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    mask = torch.ones(1, 1, 24, 24, dtype=torch.bool).triu(1)
    with torch.no_grad():
        ours = model(tokens, positions, mask)[..., : COMMON["vocab_size"]]
        ref = hf(tokens).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_export_round_trip_is_exact(tmp_path: Path, family: str) -> None:
    hf_dir, _ = _tiny_hf(family, tmp_path)
    cfg = model_config_from_hf(hf_dir)
    model = build_gpt(cfg)
    load_hf_weights(model, hf_dir, cfg)
    out = save_hf_weights(model, cfg, tmp_path / "export", hf_dir)
    original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert (out / "config.json").exists()


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        model_config_from_hf(tmp_path)

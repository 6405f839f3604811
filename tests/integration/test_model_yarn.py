"""YaRN RoPE scaling: Megatron GPT with ``model.rope_scaling=yarn`` equals transformers' Qwen3 with the same
``rope_scaling`` (its ``_compute_yarn_parameters``) past the original context; import/export keep it.

Also the context check: a sequence longer than the native context without scaling is refused naming both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from klong_megatron.config.model import ModelConfig
from klong_megatron.config.trainer import ParallelConfig
from klong_megatron.megatron.hf import export_hf, hf_config, load_hf_weights, model_config_from_hf
from klong_megatron.megatron.model import build_gpt
from klong_megatron.megatron.parallel import destroy_distributed, init_distributed

ORIGINAL, FACTOR, SEQ = 16, 4.0, 56  # the test sequence runs 3.5x past the original context
HF = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16, max_position_embeddings=int(ORIGINAL * FACTOR), rms_norm_eps=1e-6,
          rope_scaling={"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL,
                        "rope_theta": 10000.0})  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_distributed(ParallelConfig(), seed=0)
    yield
    destroy_distributed()


def _tiny_qwen3_yarn(tmp: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    hf.save_pretrained(tmp / "hf", safe_serialization=True)
    return tmp / "hf", hf


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[1]
    mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
    with torch.no_grad():
        return model(tokens, torch.arange(n).expand_as(tokens), mask)[..., : HF["vocab_size"]]


def test_yarn_model_logits_match_transformers_past_the_original_context(tmp_path: Path) -> None:
    hf_dir, hf = _tiny_qwen3_yarn(tmp_path)
    cfg = model_config_from_hf(hf_dir)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.native_context) == ("yarn", FACTOR, ORIGINAL)
    model = build_gpt(cfg).eval()
    load_hf_weights(model, hf_dir, cfg)
    tokens = torch.randint(0, HF["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(_logits(model, tokens), ref, atol=2e-5, rtol=1e-4)
    plain = build_gpt(dataclasses.replace(cfg, rope_scaling=None, native_context=None)).eval()
    load_hf_weights(plain, hf_dir, cfg)
    assert (_logits(plain, tokens) - ref).abs().max() > 1e-2  # without YaRN the positions differ: the test can fail


def test_export_keeps_yarn_and_the_weights_dtype(tmp_path: Path) -> None:
    hf_dir, _ = _tiny_qwen3_yarn(tmp_path)
    cfg = model_config_from_hf(hf_dir)
    model = build_gpt(cfg).to(torch.bfloat16)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_level_tokenizer())
    out = export_hf(model, cfg, tmp_path / "out", tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"  # trained in bf16: the servers load bf16, not fp32
    assert model_config_from_hf(out) == cfg
    theirs = transformers.AutoConfig.from_pretrained(str(out))
    ours_inv, ours_factor = _yarn(hf_config(cfg))
    ref_inv, ref_factor = _yarn(json.loads((hf_dir / "config.json").read_text()))
    assert ours_factor == pytest.approx(ref_factor) and torch.equal(ours_inv, ref_inv)
    assert theirs.max_position_embeddings == int(ORIGINAL * FACTOR)


def _yarn(config: dict) -> tuple[torch.Tensor, float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = transformers.Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))


def test_sequence_beyond_native_context_without_scaling_is_refused_naming_both() -> None:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100, native_context=32768)
    with pytest.raises(ValueError, match=r"model.seq_length \(65536\).*model.native_context \(32768\)"):
        ModelConfig(**base, seq_length=65536)
    ModelConfig(**base, seq_length=65536, rope_scaling="yarn", rope_scaling_factor=2.0)
    with pytest.raises(ValueError, match=r"\(131072\).*32768.*x model.rope_scaling_factor \(2\) = 65536"):
        ModelConfig(**base, seq_length=131072, rope_scaling="yarn", rope_scaling_factor=2.0)

"""Model presets have the published sizes; real-model experiments validate their parallel layout; TE adapter."""

from __future__ import annotations

import warnings

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.cli.sft import describe
from klong_megatron.config.model import ModelConfig
from klong_megatron.megatron import model as model_mod

pytestmark = pytest.mark.usefixtures("hydra_configs")


@pytest.mark.parametrize(
    ("preset", "billions"),
    [("llama3-1b", 1.236), ("qwen3-8b", 8.19), ("qwen2.5-32b", 32.76)],
)
def test_model_preset_has_the_published_parameter_count(preset: str, billions: float) -> None:
    cfg = OmegaConf.to_object(compose(config_name="sft", overrides=[f"model={preset}"])).model
    # padded vocab adds < 0.1%; published counts are rounded
    assert cfg.num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)


def test_moe_preset_has_the_published_total_and_active_parameter_counts() -> None:
    cfg = OmegaConf.to_object(compose(config_name="sft", overrides=["model=glm4.5-air"])).model
    assert cfg.num_parameters() / 1e9 == pytest.approx(106, rel=0.01)
    embeddings = 2 * cfg.padded_vocab_size() * cfg.hidden_size  # the published "active" count leaves them out
    assert (cfg.num_parameters(active=True) - embeddings) / 1e9 == pytest.approx(12, rel=0.02)


@pytest.mark.parametrize(
    ("experiment", "world", "layout"),
    [
        ("qwen3-8b", 32, "TP 4 x PP 1 x CP 2 x DP 4"),
        ("qwen2.5-32b", 64, "TP 8 x PP 4 x CP 1 x DP 2"),
        ("glm4.5-air", 128, "TP 2 x PP 2 x CP 2 x DP 16 (EP 16)"),
    ],
)
def test_real_model_experiment_layout_is_valid_at_its_cluster_size(experiment: str, world: int, layout: str) -> None:
    cfg = OmegaConf.to_object(compose(config_name="sft", overrides=[f"experiment={experiment}", "data.tokenizer=x"]))
    assert cfg.cluster.nodes * cfg.cluster.devices_per_node == world
    assert layout in describe(cfg, world)


def test_world_size_not_divisible_by_model_parallel_is_named() -> None:
    cfg = OmegaConf.to_object(compose(config_name="sft", overrides=["experiment=qwen3-8b", "data.tokenizer=x"]))
    with pytest.raises(ValueError, match="tp\\*pp\\*cp"):
        describe(cfg, 12)
    moe = OmegaConf.to_object(compose(config_name="sft", overrides=["experiment=glm4.5-air", "data.tokenizer=x"]))
    with pytest.raises(ValueError, match="parallel.ep=16"):
        describe(moe, 96)  # a multiple of tp*pp*cp = 8, but 96 / (tp*pp) = 24 ranks cannot hold EP 16


def test_sequence_longer_than_the_model_is_named() -> None:
    with pytest.raises(Exception, match="model.seq_length"):
        OmegaConf.to_object(compose(config_name="sft", overrides=["data.policy.max_len=4096"]))


def test_bad_head_grouping_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=3, vocab_size=8,
                    seq_length=8)  # fmt: skip


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=64, seq_length=64, **kw)


def test_auto_impl_uses_te_when_importable_and_local_otherwise() -> None:
    assert model_mod.resolve_impl(_tiny(), have_te=True) == "te"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on CPU the local spec is the only path: said once by the run, no warning
        assert model_mod.resolve_impl(_tiny(), have_te=False, on_gpu=False) == "local"


def test_te_impl_without_transformer_engine_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="transformer_impl=te"):
        model_mod.resolve_impl(_tiny(transformer_impl="te"), have_te=False)


def test_local_impl_never_uses_te_and_builds_the_local_spec() -> None:
    assert model_mod.resolve_impl(_tiny(transformer_impl="local"), have_te=True) == "local"
    spec = model_mod.layer_spec(_tiny(transformer_impl="local"), have_te=False)
    assert "DotProductAttention" in repr(spec)


@pytest.mark.skipif(not model_mod.HAVE_TE, reason="transformer_engine not importable (CPU install)")
def test_te_spec_builds_when_te_is_installed() -> None:
    assert "TE" in repr(model_mod.layer_spec(_tiny(transformer_impl="te")))

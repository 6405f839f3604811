"""The algo= presets compose; bad values in the RL objective config name their field."""

from __future__ import annotations

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config.grpo import GRPOConfig

pytestmark = pytest.mark.usefixtures("hydra_configs")


def test_klong_preset_selects_window_weighted_advantages() -> None:
    cfg = OmegaConf.to_object(compose(config_name="algo/klong"))["algo"]
    assert isinstance(cfg, GRPOConfig) and cfg.advantage_mode == "klong" and cfg.clip_high > cfg.clip_low


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("advantage_mode=ppo", "advantage_mode"),
        ("kl_estimator=k4", "kl_estimator"),
        ("clip_c=0.5", "clip_c"),
        ("clip_low=-0.1", "clip_low"),
        ("tis_cap=0", "tis_cap"),
        ("logprob_chunk_size=0", "logprob_chunk_size"),
        ("temperature=0", "temperature"),
        ("kl_coef=lots", "kl_coef"),
    ],
)
def test_bad_override_names_the_field(override: str, field: str) -> None:
    with pytest.raises(Exception, match=field):
        OmegaConf.to_object(compose(config_name="algo/klong", overrides=[override]))

"""klong-eval's config (hydra_configs/eval.yaml over EvalConfig) composes; bad values name the field."""

from __future__ import annotations

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config.eval import EvalConfig

pytestmark = pytest.mark.usefixtures("hydra_configs")


def test_eval_preset_composes() -> None:
    cfg = OmegaConf.to_object(compose(config_name="eval", overrides=["tasks=[some/dir]"]))
    assert isinstance(cfg, EvalConfig) and cfg.engine == "chat" and cfg.reproduce.sandbox.backend == "docker"


@pytest.mark.parametrize(
    ("override", "field"),
    [("samples=0", "samples"), ("engine=dev", "model_dir"), ("engine=sglang", "rollout.servers"),
     ("max_invalid_frac=1.5", "max_invalid_frac"), ("reproduce.timeout_s=0", "reproduce.timeout_s"),
     ("chat.base_url=localhost:8000", "engine.base_url"), ("tasks=[]", "tasks")],
)  # fmt: skip
def test_bad_eval_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(Exception, match=field.replace(".", r"\.")):
        OmegaConf.to_object(compose(config_name="eval", overrides=["tasks=[d]", override]))

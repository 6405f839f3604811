"""Every preset in hydra_configs/ composes against its schema; bad overrides name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config import CONFIG_DIR

PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUP_PRESETS = sorted(
    f"{p.parent.relative_to(CONFIG_DIR)}/{p.stem}"
    for p in CONFIG_DIR.rglob("*.yaml")
    if p.parent != CONFIG_DIR and "experiment" not in p.parts and "hydra" not in p.parts
)
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("hydra_configs")


@pytest.mark.parametrize("preset", GROUP_PRESETS)
def test_group_preset_composes_against_its_schema(preset: str) -> None:
    cfg = compose(config_name=preset)
    OmegaConf.to_object(cfg)


def _primaries_using(group: str) -> list[str]:
    out = []
    for name in PRIMARY:
        text = (CONFIG_DIR / f"{name}.yaml").read_text()
        if group in text:
            out.append(name)
    return out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset_composes_with_its_app(experiment: str) -> None:
    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    apps = [p for p in PRIMARY if f"app: {p}" in text] or PRIMARY
    assert apps, "no primary config to compose the experiment with"
    for app in apps:
        # Apps that declare `experiment: null` in their defaults take `experiment=X`; others `+experiment=X`.
        plus = "" if "experiment: null" in (CONFIG_DIR / f"{app}.yaml").read_text() else "+"
        cfg = compose(config_name=app, overrides=[f"{plus}experiment={experiment}"])
        OmegaConf.to_object(cfg)


def test_bad_field_type_is_named() -> None:
    with pytest.raises(Exception, match="max_len"):
        cfg = compose(config_name="data/demo", overrides=["policy.max_len=lots"])
        OmegaConf.to_object(cfg)


def test_invalid_value_is_named() -> None:
    with pytest.raises(Exception, match="overlap"):
        OmegaConf.to_object(compose(config_name="data/demo", overrides=["policy.overlap=-3"]))


def test_config_dir_is_inside_the_repo() -> None:
    assert (Path(CONFIG_DIR) / "data" / "demo.yaml").exists()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.policy.gen_reserve=100", "gen_reserve"),
        ("stages=[{timeout_s:60},{timeout_s:30}]", "timeout_s"),
        ("rollout.server_pp=0", "server_pp"),
        ("tasks.demo_forms=9", "demo_forms"),
        ("rollout.weight_pause_mode=later", "weight_pause_mode"),
        ("rollout.weight_verify=maybe", "weight_verify"),
    ],
)
def test_rl_config_errors_name_the_field(override: str, field: str) -> None:
    with pytest.raises(Exception, match=field):
        cfg = compose(config_name="rl", overrides=["experiment=rl_demo", override])
        rl = OmegaConf.to_object(cfg)
        from klong_megatron.rl.tasks import build_task_sets

        build_task_sets(rl.tasks)

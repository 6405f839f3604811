"""One context policy per model: a model's SFT and RL presets read the same hydra_configs/context/ file, and
klong-rl refuses a warm-up whose policy differs from the agent's (naming both values)."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.cli.rl import check_warmup_policy
from klong_megatron.config import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("hydra_configs")


def _presets() -> dict[str, list[tuple[str, str]]]:
    """context preset -> [(app, experiment)] of the experiments that use it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        text = path.read_text()
        m = re.search(r"override /context: (\S+)", text)
        if m:
            app = re.search(r"# app: (\w+)", text).group(1)
            out.setdefault(m.group(1), []).append((app, path.stem))
    return out


def _policy(app: str, experiment: str, *overrides: str):
    return OmegaConf.to_object(compose(config_name=app, overrides=[f"experiment={experiment}", *overrides])).data.policy


def test_sft_and_rl_presets_of_a_model_read_one_policy() -> None:
    presets = _presets()
    assert {"sft", "rl"} <= {app for app, _ in presets["qwen3-8b"]}, "Qwen3-8B has an SFT and an RL preset"
    for context, users in presets.items():
        policies = {experiment: _policy(app, experiment) for app, experiment in users}
        assert len({repr(p) for p in policies.values()}) == 1, f"context={context}: {policies}"
        p = next(iter(policies.values()))
        assert p.pin_reading and p.keep_full_turns and p.carry_tokens, f"{context}: paper-task policy"
        for _, experiment in users:  # the context file is the one place: presets do not set a policy
            assert "\n  policy:" not in (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()


def test_rl_refuses_gen_reserve_below_max_new_tokens() -> None:
    with pytest.raises(Exception, match=r"gen_reserve \(8256\).*max_new_tokens \(9000\)"):
        _policy("rl", "rl_qwen3_8b", "rollout.sampling.max_new_tokens=9000")


def _sft_run(tmp_path: Path, **policy) -> Path:
    run = tmp_path / "sft-run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000100").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"policy": policy}}))
    return run / "checkpoints" / "iter_0000100"


def test_rl_refuses_a_warmup_checkpoint_split_with_another_policy(tmp_path: Path) -> None:
    cfg = OmegaConf.to_object(compose(config_name="rl", overrides=["experiment=rl_demo"]))
    same = asdict(cfg.data.policy)
    cfg.init_from_checkpoint = str(_sft_run(tmp_path / "a", **same))
    check_warmup_policy(cfg)  # the same policy: accepted
    cfg.init_from_checkpoint = str(_sft_run(tmp_path / "b", **{**same, "max_len": 2048, "gen_reserve": 0}))
    with pytest.raises(ValueError) as e:
        check_warmup_policy(cfg)
    msg = str(e.value)
    assert "max_len: 2048 != 1024" in msg and "gen_reserve: 0 != 200" in msg and "sft-run" in msg

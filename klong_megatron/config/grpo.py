"""Schema of the RL objective (``algo=`` group): advantages, PPO-clip loss, KL, entropy, log-prob chunking."""

from __future__ import annotations

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from klong_megatron.algo.grpo import ADVANTAGE_MODES, KL_ESTIMATORS, LOSS_AGGREGATIONS


@dataclass
class GRPOConfig:
    """How judged rollouts become a policy-gradient loss (see ``klong_megatron.algo.grpo``)."""

    advantage_mode: str = "klong"
    """klong (reward minus mean over all windows of the task's rollouts), grpo, dr_grpo or rloo."""
    advantage_eps: float = 1e-6
    """Added to the group reward std in grpo mode."""
    loss_agg: str = "token"
    """token: every trained token of a step weighs the same (a long rollout weighs more); rollout: each
    rollout weighs the same (its advantage scaled by mean tokens / its tokens, ``rl/windows.py``)."""
    filter_zero_variance: bool = True
    """Drop task groups whose rollouts all got the same reward (no learning signal)."""
    clip_low: float = 0.2
    """PPO ratio lower clip: r >= 1 - clip_low."""
    clip_high: float = 0.28
    """PPO ratio upper clip (clip-higher): r <= 1 + clip_high."""
    clip_c: float | None = None
    """Dual-clip bound (> 1) on the loss of negative-advantage tokens; null disables."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy; 0 skips the reference forward pass."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (Schulman's estimators of KL(pi || pi_ref))."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    tis_cap: float | None = 2.0
    """Truncated importance sampling cap on exp(old - rollout) log-probs; null disables the correction."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk when computing log-probs from hidden states (peak ~3 x chunk x vocab floats)."""
    temperature: float = 1.0
    """Log-prob temperature of batches that carry no per-token ``temperatures``. The RL trainer's rows carry
    each rollout's recorded sampling temperature (``rl/windows.py``; unknown: rollout.sampling.temperature),
    so old/reference log-probs and TIS match what SGLang reported whatever this says."""

    def __post_init__(self) -> None:
        if self.advantage_mode not in ADVANTAGE_MODES:
            raise ValueError(f"advantage_mode must be one of {ADVANTAGE_MODES}, got {self.advantage_mode!r}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        for name in ("advantage_eps", "clip_low", "clip_high", "kl_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_c is not None and self.clip_c <= 1.0:
            raise ValueError(f"clip_c must be > 1 or null, got {self.clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or null, got {self.tis_cap}")
        if self.logprob_chunk_size < 1:
            raise ValueError(f"logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def register(cs: ConfigStore) -> None:
    cs.store(group="algo", name="algo_schema", node=GRPOConfig)

"""Collapse and stall detection for the RL loop: one verdict per iteration from its metrics.

Dataflow: the iteration's metrics (rollout reward, kept windows, the update's ``approx_kl`` and
``entropy``) -> ``HealthMonitor.check`` -> a list of reasons (empty when healthy) -> the trainer acts
as ``rl.health.action`` says: ``warn`` (log loudly, go on), ``rollback`` (reload the best checkpoint,
multiply the learning rate by ``lr_factor``, discard rollouts of the collapsed policy; after
``max_rollbacks`` it stops) or ``stop`` (raise ``RLHealthError`` with the reasons).

Signals (each disabled by null):
- stall: no trainable window (every group zero-variance, or all stale) for ``stall_iterations`` in a row:
  the run would go on without ever updating again;
- KL spike: the update's ``approx_kl`` (old vs updated policy, mean over trained tokens) above ``max_kl``;
- entropy spike: the update's entropy above ``max_entropy_ratio`` x the entropy of the first update;
- reward drop: the iteration's mean reward below ``(1 - reward_drop)`` x the best mean reward of the
  stage so far (only once that best is at least ``min_best_reward``; the first iteration of a stage has
  nothing to compare with);
- held-out drop (``check_eval``, after each stage's evaluation): the score below ``(1 - eval_drop)`` x the
  best held-out score so far (after SFT included; only once that best is at least ``min_best_reward``).

Pure: no torch, no I/O. The monitor's state is a plain dict (kept in ``rl_state.json`` for resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from klong_megatron.config.rl import HealthConfig


class RLHealthError(RuntimeError):
    """The run stopped because of a collapse or a stall (the message names the signals and values)."""


@dataclass
class HealthMonitor:
    """Tracks one run's reference values; ``check`` is called once per iteration, in order."""

    cfg: HealthConfig
    state: dict[str, Any] = field(default_factory=dict)
    """``stalls`` (consecutive), ``entropy0`` (first update's entropy), ``stage``, ``best_reward``
    (of that stage), ``rollbacks`` (done so far)."""

    def check(self, stage: int, metrics: dict[str, float]) -> list[str]:
        """Reasons the iteration looks collapsed or stalled (empty: healthy). Updates the references.

        ``metrics`` keys used: ``reward_mean``, ``windows/windows`` (kept windows; 0 = no update),
        ``approx_kl`` and ``entropy`` (present only when an update ran).
        """
        c, st = self.cfg, self.state
        reasons = []
        trained = metrics.get("windows/windows", 0.0) > 0
        st["stalls"] = 0 if trained else st.get("stalls", 0) + 1
        if c.stall_iterations is not None and st["stalls"] >= c.stall_iterations:
            reasons.append(
                f"stall: no trainable group for {st['stalls']} iterations (every group's rollouts got the same "
                f"reward, e.g. all 0: the policy no longer produces anything the rubric rewards)"
            )
        kl = metrics.get("approx_kl")
        if trained and c.max_kl is not None and kl is not None and kl > c.max_kl:
            reasons.append(f"KL spike: approx_kl {kl:.4f} > rl.health.max_kl {c.max_kl}")
        ent = metrics.get("entropy")
        if trained and ent is not None:
            ent0 = st.setdefault("entropy0", ent)
            if c.max_entropy_ratio is not None and ent0 > 0 and ent > c.max_entropy_ratio * ent0:
                reasons.append(
                    f"entropy spike: {ent:.4f} > rl.health.max_entropy_ratio {c.max_entropy_ratio} x first "
                    f"update's {ent0:.4f}"
                )
        reward = metrics.get("reward_mean")
        if st.get("stage") != stage:
            st["stage"], st["best_reward"] = stage, None
        best = st.get("best_reward")
        if reward is not None:
            if c.reward_drop is not None and best is not None and best >= c.min_best_reward:
                floor = (1.0 - c.reward_drop) * best
                if reward < floor:
                    reasons.append(
                        f"reward drop: {reward:.3f} < (1 - rl.health.reward_drop {c.reward_drop}) x stage {stage}'s "
                        f"best {best:.3f}"
                    )
            st["best_reward"] = reward if best is None else max(best, reward)
        return reasons

    def check_eval(self, label: str, score: float, best: float | None) -> list[str]:
        """Reasons a held-out ``score`` (evaluation ``label``) looks collapsed against the run's ``best``."""
        c = self.cfg
        if c.eval_drop is None or best is None or best < c.min_best_reward or score >= (1.0 - c.eval_drop) * best:
            return []
        return [
            f"held-out drop: {label} scored {score:.3f} < (1 - rl.health.eval_drop {c.eval_drop}) x best {best:.3f}"
        ]

    def after_rollback(self) -> None:
        """Count a rollback; the stall counter restarts (the references stay)."""
        self.state["rollbacks"] = self.state.get("rollbacks", 0) + 1
        self.state["stalls"] = 0

    def action(self, reasons: list[str]) -> str:
        """What to do about ``reasons``: ``ok``, ``warn``, ``rollback`` or ``stop`` (rollbacks used up)."""
        if not reasons:
            return "ok"
        if self.cfg.action == "rollback" and self.state.get("rollbacks", 0) >= self.cfg.max_rollbacks:
            return "stop"
        return self.cfg.action

"""``rl_state.json``: the progress of an RL run, written atomically after every iteration.

A restarted run reads it to continue at the next (stage, iteration); with continuous refill it also
records how many complete rollout groups the trainer has taken from the service's group log
(``rollout/service.py``), so groups finished while the trainer was down are picked up, none twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class RLState:
    """Progress of a run, written atomically after every iteration (``rl_state.json``)."""

    stage: int = 0
    iteration: int = 0
    """next iteration to run in ``stage``"""
    version: int = 0
    """policy version = GRPO updates done (the rollout servers' ``weight_version``)"""
    sft_done: bool = False
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    """held-out judge score per evaluation label (initial, sft, stage0, ...)"""
    best: dict[str, Any] = dataclasses.field(default_factory=dict)
    log_step: int = 0
    """metrics step of the last logged iteration (SFT warm-up steps, then one per update): a resumed run
    continues the same W&B run at the next step"""
    wall_s: dict[str, float] = dataclasses.field(default_factory=dict)
    """wall time per phase: ``sft`` (warm-up), ``stage<k>`` (its iterations and evaluations), ``eval_<label>``"""
    health: dict[str, Any] = dataclasses.field(default_factory=dict)
    """collapse / stall detector state (``rl/health.py``): reference entropy, stage best reward, rollbacks"""
    groups_taken: int = 0
    """continuous refill: entries of the service's group log consumed by updates (taken or skipped)"""

    @classmethod
    def load(cls, path: Path) -> RLState:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)

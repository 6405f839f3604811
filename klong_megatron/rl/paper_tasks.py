"""Paper tasks (``tasks.source=dir``) in the RL loop: rollout in the task's own sandbox, then grading.

Dataflow: RolloutTask -> ``paper_generate``: tasks/rollout.paper_rollout (fresh sandbox, /paper read-only,
the task's blacklist in the ToolSet) -> ``paper_grade``: eval/grading.grade_paper_rollout (monitor: flagged
-> reward 0; reproduce.sh in a fresh ``reproduce.sandbox``; judge at the given priority; invalid share
above ``rl.max_invalid_frac`` -> ``reward_excluded``) -> the judged Trajectory the trainer stores. The two
halves are separate so the rollout service can free a rollout slot before grading (``rl/rollouts.py``).
"""

from __future__ import annotations

from typing import Any

from klong_megatron.config.sandbox import ToolsConfig
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.eval.grading import grade_paper_rollout
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.tasks.paperbench import PaperTask
from klong_megatron.tasks.rollout import paper_rollout


async def paper_generate(
    services: Any, agent: Any, task: PaperTask, rtask: RolloutTask, tools: ToolsConfig
) -> Trajectory:
    """The agent's rollout of a paper task on ``services`` (``rl/services.py``: cfg, stage_root), ungraded."""
    c = services.cfg
    return await paper_rollout(agent, task, rtask, sandbox=c.sandbox, tools=tools, stage_root=services.stage_root)


async def paper_grade(services: Any, task: PaperTask, traj: Trajectory, priority: str) -> Trajectory:
    """Reproduction step + judge of a generated paper-task rollout (``services.judge`` at ``priority``)."""
    c = services.cfg
    return await grade_paper_rollout(traj, task, services.judge, reproduce_cfg=c.reproduce, priority=priority,
                                     max_invalid_frac=c.rl.max_invalid_frac)  # fmt: skip

"""One agent rollout of a paper task in its own sandbox (shared by klong-eval and klong-rl).

Dataflow: staged task (workspace.stage_task) -> fresh sandbox with /paper bound read-only and
``W/submission`` created -> ToolSet with the task's blacklist (refusals recorded) -> ``agent.run``
(token AgentLoop or ChatAgent: anything with ``run(RolloutTask, tools, workdir)``) -> the work dir
exported -> sandbox closed. ``meta.blacklist_refused`` lists the refused calls; the post-hoc monitor
(eval/grading.py) flags the rollout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.sandbox import make_sandbox
from klong_megatron.sandbox.blacklist import Blacklist
from klong_megatron.sandbox.tools import ToolSet
from klong_megatron.tasks.paperbench import PaperTask
from klong_megatron.tasks.workspace import SUBMISSION, stage_task, task_sandbox_config


async def paper_rollout(
    agent: Any,
    task: PaperTask,
    rtask: RolloutTask,
    *,
    sandbox: SandboxConfig,
    tools: ToolsConfig,
    stage_root: str | Path,
) -> Trajectory:
    """Run ``agent`` on ``task`` in a fresh sandbox; raises only when the infrastructure fails."""
    staged = await asyncio.to_thread(stage_task, task, Path(stage_root) / task.task_id)
    sb = make_sandbox(task_sandbox_config(sandbox, staged))
    await asyncio.to_thread(sb.start)
    try:
        await asyncio.to_thread(sb.exec, f"mkdir -p {SUBMISSION}", timeout=30)
        toolset = ToolSet(sb, tools, blacklist=Blacklist(task.blacklist))
        traj = await agent.run(rtask, toolset, workdir=sb)
        traj.meta["blacklist_refused"] = [dataclasses.asdict(v) for v in toolset.violations]
        return traj
    finally:
        await asyncio.to_thread(sb.close)

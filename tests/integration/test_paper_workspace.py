"""The paper workspace is the same on Docker and bubblewrap: the real task's paper read-only at /paper (no rubric),
the submission directory under the work dir, the task's blacklist refused by the ToolSet and recorded."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.rollout.manager import RolloutTask
from klong_megatron.tasks import load_paper_task
from klong_megatron.tasks.rollout import paper_rollout
from klong_megatron.tasks.workspace import staging_root

TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_tasks"
BACKENDS = [pytest.param("bwrap", marks=pytest.mark.bwrap), pytest.param("docker", marks=pytest.mark.docker)]


class ScriptedAgent:
    """Calls tools directly (no model) and keeps the observations; exports the work dir like the agent loops."""

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = export_dir
        self.seen: dict[str, str] = {}

    async def run(self, task: RolloutTask, tools, workdir=None) -> Trajectory:
        calls = {
            "ls": ("bash", '{"command": "ls -A /paper; pwd; ls -d submission"}'),
            "tamper": ("bash", '{"command": "echo x >> /paper/paper.md; echo rc=$?"}'),
            "write": ("write_file", '{"file": "submission/notes.md", "content": "n"}'),
            "clone": ("bash", '{"command": "git clone https://github.com/ajyl/dpo_toxic"}'),
        }
        for key, (name, args) in calls.items():
            self.seen[key] = (await asyncio.to_thread(tools.call, name, args)).text
        exported = workdir.export(self.export_dir / "w")
        return Trajectory(task.id, list(task.messages), {"workdir": str(exported)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_mounted_read_only_at_the_same_paths(tmp_path: Path, backend: str) -> None:
    if not TASKS.is_dir():
        pytest.skip(f"real PaperBench task folders not found at {TASKS}")
    task = load_paper_task(TASKS / "mechanistic-understanding")
    agent, root = ScriptedAgent(tmp_path), staging_root()
    sandbox = SandboxConfig(backend=backend, memory_mb=1024)
    try:
        rollout = paper_rollout(agent, task, RolloutTask(task.task_id, [], 0), stage_root=root, sandbox=sandbox,
                                tools=ToolsConfig())  # fmt: skip
        traj = asyncio.run(rollout)
    finally:
        shutil.rmtree(root)
    assert agent.seen["ls"].split()[:5] == ["addendum.md", "blacklist.txt", "paper.md", "/workspace", "submission"]
    assert "rc=0" not in agent.seen["tamper"]  # read-only for the agent (root in Docker included)
    assert agent.seen["clone"].startswith("Refused")
    assert traj.meta["blacklist_refused"][0]["url"] == "github.com/ajyl/dpo_toxic"
    assert (Path(traj.meta["workdir"]) / "submission" / "notes.md").read_text() == "n"
    assert not (Path(traj.meta["workdir"]) / "paper").exists()

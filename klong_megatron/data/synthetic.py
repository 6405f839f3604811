"""Synthetic long-horizon trajectories for tests and benchmarks (no model, no sandbox).

``tool_trajectory(700)`` is shaped like a paper-reproduction run: a system and a task message, then
``turns`` assistant turns that each call ``bash`` and get an output of 1 to ``max_lines`` lines (lengths
vary deterministically, so windows fill unevenly, as with real tool outputs). Pure module.
"""

from __future__ import annotations

import json

from klong_megatron.data.trajectory import Message, ToolCall, Trajectory


def tool_trajectory(turns: int, max_lines: int = 120, traj_id: str | None = None) -> Trajectory:
    """A trajectory of ``2 + 2 * turns`` messages (system, user, then assistant tool call + tool output)."""
    msgs = [Message("system", "You are a research agent."), Message("user", "Reproduce the paper.")]
    for k in range(turns):
        call = ToolCall("bash", json.dumps({"command": f"python step_{k}.py"}), f"call_{k}")
        msgs.append(Message("assistant", f"Step {k}: run the next script.", tool_calls=(call,)))
        lines = "\n".join(f"epoch {i} loss {1 / (i + k + 1):.4f} ü" for i in range(1 + (k * 37) % max_lines))
        msgs.append(Message("tool", lines, tool_call_id=f"call_{k}", name="bash"))
    return Trajectory(traj_id or f"tool-{turns}", msgs, {"source": "synthetic"})

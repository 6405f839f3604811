"""Grade one finished paper rollout: blacklist monitor -> reproduction step -> judge -> honest reward.

Dataflow::

    Trajectory (+ its exported work dir W) -> monitor: scan_messages over tool calls and outputs with
      the task's blacklist (PaperBench's monitor; URLs the paper itself cites count only in tool calls);
      any hit -> reward 0, flagged, nothing else runs
    -> W/submission -> reproduce() in a fresh sandbox -> W.executed (real reproduce.log + meta)
    -> judge.grade(W.executed, rubric, paper, addendum + judge addendum) -> JudgeResult
    -> reward = score over the valid leaves; invalid share > max_invalid_frac -> excluded

The outcome is written into ``traj.meta`` (keys in :data:`GRADE_KEYS`), so the RL trainer and
klong-eval store and resume it with the trajectory. An excluded rollout keeps its (partial) score for
reports but must not enter a training update or a mean: callers check ``reward_excluded``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.data.trajectory import Trajectory
from klong_megatron.eval.reproduce import reproduce
from klong_megatron.sandbox._common import SandboxError
from klong_megatron.sandbox.blacklist import Blacklist, scan_messages
from klong_megatron.tasks.paperbench import PaperTask
from klong_megatron.tasks.workspace import SUBMISSION

GRADE_KEYS = ("reward", "reward_excluded", "judge_invalid_frac", "judge_invalid", "judge_per_category",
              "judge_token_usage", "blacklist_flagged", "blacklist_violations", "reproduce", "graded_dir",
              "grade_json")  # fmt: skip


def invalid_fraction(result: Any) -> float:
    """Share of rubric leaves the judge could not grade (``JudgeResult.invalid_frac`` when it has one)."""
    frac = getattr(result, "invalid_frac", None)
    if frac is not None:
        return float(frac)
    n = len(result.leaves)
    return len(result.invalid) / n if n else 0.0


def monitor(traj: Trajectory, blacklist: Blacklist, task_text: str = "") -> list[dict[str, Any]]:
    """Blacklisted resources in the rollout's tool calls (refused ones included) and tool outputs.

    A URL that the task's own text (``task_text``: paper + addendum) mentions is reported only from
    tool calls: reading the paper, which cites its official code, must not flag a rollout.
    """
    if not blacklist:
        return []
    cited = {u for u in blacklist.urls if Blacklist([u]).match(task_text)}
    found = scan_messages([m.to_json() for m in traj.messages], blacklist)
    return [
        {"message": v.message_index, "tool": v.tool, "url": v.url, "excerpt": v.excerpt}
        for v in found
        if v.role == "assistant" or v.url not in cited
    ]


async def grade_paper_rollout(
    traj: Trajectory,
    task: PaperTask,
    judge: Any,
    *,
    reproduce_cfg: ReproduceConfig,
    priority: str,
    max_invalid_frac: float,
) -> Trajectory:
    """Monitor, reproduce and judge ``traj`` (its ``meta.workdir`` must be the exported work dir);
    fills the :data:`GRADE_KEYS` of ``traj.meta`` and returns ``traj``."""
    meta = traj.meta
    violations = monitor(traj, Blacklist(task.blacklist), task.paper + task.addendum)
    meta.update(blacklist_flagged=bool(violations), blacklist_violations=violations, reproduce=None)
    if violations:
        meta.update(reward=0.0, reward_excluded=False, judge_invalid_frac=0.0, judge_invalid=[],
                    judge_per_category={}, judge_token_usage={}, graded_dir=None, grade_json=None)  # fmt: skip
        return traj
    work = Path(meta["workdir"])
    submission = work / SUBMISSION
    submission.mkdir(parents=True, exist_ok=True)  # nothing submitted is graded as empty
    graded = submission
    if reproduce_cfg.enabled:
        graded = work.with_name(work.name + ".executed")
        for attempt in range(2):  # a sandbox that fails to start is retried once; a failing script is an outcome
            try:
                rmeta = await asyncio.to_thread(reproduce, submission, graded, reproduce_cfg)
                break
            except SandboxError:
                if attempt:
                    raise
        meta["reproduce"] = rmeta.to_dict()
    out = graded.with_name(graded.name + ".grade.json")
    result = await judge.grade(graded, task.rubric, priority=priority, paper=task.paper,
                               addendum=task.addendum, judge_addendum=task.judge_addendum, out_path=out)  # fmt: skip
    frac = invalid_fraction(result)
    meta.update(
        reward=float(result.score),
        reward_excluded=frac > max_invalid_frac,
        judge_invalid_frac=frac,
        judge_invalid=list(result.invalid),
        judge_per_category=dict(result.per_category),
        judge_token_usage=dict(getattr(result, "token_usage", {})),
        graded_dir=str(graded),
        grade_json=str(out),
    )
    return traj

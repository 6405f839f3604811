"""Rubric-tree judge: PaperBench rubrics, LLM and check-command leaf graders, a persistent priority queue.

    judge, pool = build_judge(cfg)            # cfg: klong_megatron.config.judge.JudgeConfig
    async with judge:
        result = await judge.grade(submission_dir, rubric, priority="train")   # -> JudgeResult

Names load lazily so that importing the pure ``judge.rubric`` does not pull in HTTP or sandbox code.
"""

from typing import Any

__all__ = ["Judge", "JudgeResult", "build_judge"]


def __getattr__(name: str) -> Any:
    if name in ("Judge", "JudgeResult"):
        from klong_megatron.judge import judge

        return getattr(judge, name)
    if name == "build_judge":
        from klong_megatron.judge.factory import build_judge

        return build_judge
    raise AttributeError(name)

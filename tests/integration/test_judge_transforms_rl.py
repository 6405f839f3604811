"""klong-rl applies the same rubric transforms as klong-judge and klong-eval (judge.factory.prepare_rubric)."""

from __future__ import annotations

from pathlib import Path

from klong_megatron.config.judge import JudgeConfig
from klong_megatron.config.rl import TasksConfig
from klong_megatron.rl.tasks import build_task_sets

TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_tasks"  # the real task folders


def test_klong_rl_grades_its_paper_tasks_with_the_transformed_rubric() -> None:
    from klong_megatron.rl.trainer import prepare_rubrics  # what RLTrainer.__init__ applies to its task sets

    train, held = build_task_sets(TasksConfig(source="dir", dir=str(TASKS), num_eval=1))
    before = {t.task_id: t.rubric for t in train + held}
    prepare_rubrics(train + held, JudgeConfig(code_only=True, use_checks=False))
    for t in train + held:
        assert {leaf.task_category for leaf in t.rubric.leaves()} == {"Code Development"}
        assert len(list(t.rubric.leaves())) < len(list(before[t.task_id].leaves()))
        assert t.paper_task is not None and t.paper_task.rubric is t.rubric  # what eval/grading.py grades

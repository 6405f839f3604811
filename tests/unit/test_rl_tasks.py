"""RL task sets: demo tasks (disjoint train/held-out), PaperBench-style folders, deterministic sampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from klong_megatron.config.rl import TasksConfig
from klong_megatron.rl.tasks import build_task_sets, load_task_dir, sample_tasks

RUBRICS = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_rubrics"  # real PaperBench rubrics


def test_demo_tasks_are_deterministic_and_held_out_tasks_are_unseen():
    cfg = TasksConfig(source="demo", num_train=20, num_eval=5, demo_functions=1)
    train, held = build_task_sets(cfg)
    again, _ = build_task_sets(cfg)
    assert [t.task_id for t in train] == [t.task_id for t in again]
    assert len(train) == 20 and len(held) == 5
    assert not {t.paper for t in train} & {t.paper for t in held}
    task = train[0]
    assert task.files["paper.md"] == task.paper and task.messages[-1].role == "user"
    leaves = list(task.rubric.leaves())
    assert leaves and all(leaf.check for leaf in leaves)


def test_sampling_is_a_pure_function_of_seed_stage_and_iteration():
    train, _ = build_task_sets(TasksConfig(source="demo", num_train=30, num_eval=1, demo_functions=1))
    a = sample_tasks(train, 4, seed=1, stage=0, iteration=3)
    assert [t.task_id for t in a] == [t.task_id for t in sample_tasks(train, 4, seed=1, stage=0, iteration=3)]
    assert len({t.task_id for t in a}) == 4
    assert [t.task_id for t in a] != [t.task_id for t in sample_tasks(train, 4, seed=1, stage=0, iteration=4)]
    assert len(sample_tasks(train[:2], 4, seed=1, stage=0, iteration=0)) == 2


def _task_folder(root: Path, name: str, rubric: Path) -> Path:
    d = root / name
    d.mkdir()
    (d / "paper.md").write_text(f"# {name}\n")
    shutil.copy(rubric, d / "rubric.json")
    return d


def test_paperbench_task_folders_load_with_their_real_rubrics(tmp_path):
    rubrics = sorted(RUBRICS.glob("*.json"))
    for r in rubrics:
        _task_folder(tmp_path, r.name.split(".")[0], r)
    (tmp_path / rubrics[0].name.split(".")[0] / "blacklist.txt").write_text("https://github.com/x/y\n")
    train, held = build_task_sets(TasksConfig(source="dir", dir=str(tmp_path), num_eval=1))
    assert len(train) == len(rubrics) - 1 and len(held) == 1
    assert held[0].meta["blacklist"] == ["https://github.com/x/y"]
    assert all(len(list(t.rubric.leaves())) > 10 for t in train + held)


def test_missing_files_and_too_few_tasks_are_named(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "paper.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"broken.*rubric\.json"):
        load_task_dir(tmp_path / "broken")
    only = tmp_path / "only"
    only.mkdir()
    _task_folder(only, "t", sorted(RUBRICS.glob("*.json"))[0])
    with pytest.raises(ValueError, match="num_eval"):
        build_task_sets(TasksConfig(source="dir", dir=str(only), num_eval=1))

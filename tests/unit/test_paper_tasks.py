"""PaperBench task folders (klong_megatron/tasks/): the real folders load; broken ones fail naming folder and file;
the prompt states the sandbox paths, budget, reproduce.sh contract and the blacklist; staging never copies the
rubric or the judge addendum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from klong_megatron.tasks import find_task_dirs, instructions, load_paper_task
from klong_megatron.tasks.workspace import stage_task

TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "paperbench_tasks"
pytestmark = pytest.mark.skipif(not TASKS.is_dir(), reason=f"real PaperBench task folders not found at {TASKS}")


def test_real_paperbench_folders_load_with_optional_files_absent():
    dirs = find_task_dirs(TASKS)  # instructions/ holds no task: not listed
    assert [d.name for d in dirs] == [
        "mechanistic-understanding",
        "semantic-self-consistency",
        "stochastic-interpolants",
    ]
    tasks = {d.name: load_paper_task(d) for d in dirs}
    mech, sem, sto = tasks.values()
    assert mech.blacklist == ["https://github.com/ajyl/dpo_toxic"] and mech.addendum and not mech.has_pdf
    assert sem.blacklist == [] and sem.addendum == ""  # blacklist.txt says "none"
    assert sto.paper_id == "stochastic-interpolant" and sto.task_id == "stochastic-interpolants"
    assert [len(list(t.rubric.leaves())) for t in tasks.values()] == [96, 77, 69]


def _copy(tmp_path: Path, name: str = "mechanistic-understanding") -> Path:
    return Path(shutil.copytree(TASKS / name, tmp_path / name))


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (lambda d: (d / "paper.md").unlink(), r"mechanistic-understanding: missing paper\.md"),
        (lambda d: (d / "rubric.json").unlink(), r"mechanistic-understanding: missing rubric\.json"),
        (lambda d: (d / "rubric.json").write_text('{"id": "x", "requirements": "r", "weight": 1, "sub_tasks": [}'),
         r"rubric\.json.*invalid JSON"),
        (lambda d: (d / "rubric.json").write_text(json.dumps({"id": "x", "requirements": "r", "weight": -1,
                                                               "sub_tasks": []})), r"rubric\.json.*weight"),
        (lambda d: (d / "config.yaml").write_text("id: [1, 2\n"), r"config\.yaml is not valid YAML"),
        (lambda d: (d / "blacklist.txt").write_text("not a url\n"), r"blacklist\.txt: line 1"),
        (lambda d: (d / "paper.md").write_bytes(b"\xff\xfe bad"), r"paper\.md is not UTF-8"),
    ],
)  # fmt: skip
def test_broken_task_folder_names_folder_and_file(tmp_path, breakage, error):
    d = _copy(tmp_path)
    breakage(d)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_paper_task(d)


def test_instructions_state_paths_budget_contract_and_blacklist():
    task = load_paper_task(TASKS / "mechanistic-understanding")
    text = instructions(task, workdir="/workspace", time_budget_s=4 * 3600, reproduce_timeout_s=600)
    for part in ("/paper/paper.md", "/paper/addendum.md", "/workspace/submission/reproduce.sh", "4.0 hours",
                 "10 minutes", "bash reproduce.sh", "https://github.com/ajyl/dpo_toxic", "venv"):  # fmt: skip
        assert part in text, part
    assert "rubric" not in text.lower()


def test_staging_copies_only_agent_visible_files(tmp_path):
    d = _copy(tmp_path)
    (d / "judge.addendum.md").write_text("secret grading notes")
    task = load_paper_task(d)
    assert "secret grading notes" in task.judge_addendum_text
    staged = stage_task(task, tmp_path / "staged" / task.task_id)
    assert sorted(p.name for p in staged.iterdir()) == ["addendum.md", "blacklist.txt", "paper.md"]
    assert staged.stat().st_mode & 0o005 == 0o005 and (staged / "paper.md").stat().st_mode & 0o004

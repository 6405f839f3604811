"""Stage 5, task folders: a paper's outputs -> ``<output_dir>/tasks/<paper_id>/`` in the PaperBench layout.

Writes ``paper.md``, ``rubric.json``, ``config.yaml`` (``id``, ``title``), ``blacklist.txt`` and, when present,
``addendum.md`` and ``paper.pdf`` (tasks/paperbench.py documents the layout), into a temporary sibling folder
that is renamed into place only after :func:`klong_megatron.tasks.paperbench.load_paper_task` loaded it: a
folder under ``tasks/`` is always complete and valid, and ``klong-eval`` / ``klong-rl`` read it as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from klong_megatron.factory.store import PaperDir
from klong_megatron.tasks.paperbench import PaperTask, load_paper_task


def write_task(paper: PaperDir, tasks_dir: Path) -> PaperTask:
    """Build, validate and place the task folder of ``paper``; returns the loaded task."""
    meta = paper.meta()
    final = tasks_dir / paper.paper_id
    tmp = tasks_dir / f".{paper.paper_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("paper.md", "rubric.json", "blacklist.txt", "addendum.md", "paper.pdf"):
        if paper.path(name).is_file():
            shutil.copyfile(paper.path(name), tmp / name)
    config = {"id": paper.paper_id, "title": str(meta.get("title") or paper.paper_id)}
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    load_paper_task(tmp)  # raises naming the file when anything is off
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return load_paper_task(final)

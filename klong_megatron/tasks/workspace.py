"""The sandbox an agent reproduces a paper in: fixed paths, the paper mounted read-only, the prompt.

Layout inside every sandbox (Docker and bubblewrap alike; ``W`` = ``sandbox.workdir``, /workspace by
default)::

    /paper/paper.md, /paper/paper.pdf, /paper/addendum.md, /paper/blacklist.txt, /paper/assets/
                        read-only bind of a staged copy of the task's agent-visible files
    W/submission/       the submission (graded; reproduce.sh runs from a copy of it)
    W/                  scratch space (not graded)

Dataflow: :func:`stage_task` copies the agent-visible files of a :class:`PaperTask` to a host dir
(world-readable: bwrap runs as an unprivileged uid) -> :func:`task_sandbox_config` adds the
read-only bind -> a fresh sandbox per rollout -> the agent reads :func:`instructions`.
``rubric.json`` and ``judge.addendum.md`` are never staged.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from klong_megatron.config.sandbox import SandboxConfig
from klong_megatron.data.trajectory import Message
from klong_megatron.tasks.paperbench import AGENT_FILES, PaperTask

PAPER_DIR = "/paper"
SUBMISSION = "submission"
"""The submission directory, relative to the sandbox work dir."""


def _hours(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} hours"
    return f"{s / 60:.0f} minutes" if s >= 120 else f"{s:.0f} seconds"


def instructions(
    task: PaperTask, *, workdir: str = "/workspace", time_budget_s: float, reproduce_timeout_s: float, gpus: int = 0
) -> str:
    """The task prompt in this project's words: paths, time budget, the reproduce.sh contract, the rules."""
    sub = f"{workdir.rstrip('/')}/{SUBMISSION}"
    files = [f"- {PAPER_DIR}/paper.md: the paper (Markdown)"]
    if task.has_pdf:
        files.append(f"- {PAPER_DIR}/paper.pdf: the same paper as PDF")
    if task.assets:
        files.append(f"- {PAPER_DIR}/assets/: its figures ({len(task.assets)} files)")
    if task.addendum:
        files.append(f"- {PAPER_DIR}/addendum.md: clarifications from the task authors (what is in scope, "
                     "substitutes for unavailable resources); read it before planning")  # fmt: skip
    if task.blacklist:
        files.append(f"- {PAPER_DIR}/blacklist.txt: resources you must not use")
    rules = (
        "Do not look at or use the paper's official code or any resource listed in blacklist.txt "
        f"({', '.join(task.blacklist)}). Such attempts are refused and recorded, and a run that used them "
        "scores 0."
        if task.blacklist
        else "Do not look for or use the paper's official code release."
    )
    hw = f"{gpus} GPU(s)" if gpus else "CPU only (no GPU)"
    title = f" ({task.title})" if task.title else ""
    return "\n".join(
        [
            f"Reproduce the research paper{title} as fully as you can, working alone in a Linux sandbox.",
            "",
            f"Read-only input files in {PAPER_DIR}/:",
            *files,
            "",
            f"Write your work to {sub}/ (created for you). {workdir} is your scratch space; only {sub}/ is kept.",
            "",
            "Goal: re-implement and run the paper's core experiments and report your results. Experiments that",
            "appear only in an appendix are out of scope. Partial credit is given per requirement, weighted by",
            "importance, so prioritise the main contributions and keep everything runnable.",
            "",
            "Deliverable:",
            f"- {sub}/reproduce.sh: after you finish, a fresh copy of {sub}/ (without venv/ or .venv/) is placed",
            f"  in a new sandbox of the same kind ({hw}) and `bash reproduce.sh` runs there from inside it, for",
            f"  at most {_hours(reproduce_timeout_s)}. It must install what it needs, run your code and write",
            "  every result (tables, figures, metric files) that should be graded. Use relative paths only.",
            "- Its combined output is saved as reproduce.log by the grader (a reproduce.log you write is",
            "  replaced). Results that reproduce.sh does not produce are not credited.",
            f"- {sub}/README.md: what you reproduced, how the code maps to the paper, expected outputs.",
            "",
            f"Time budget: {_hours(time_budget_s)} of wall-clock time for this session. Test reproduce.sh early",
            "and often. Call the submit tool when you are done; work still running at the deadline is graded",
            "as it stands.",
            "",
            rules,
        ]
    )


def paper_messages(task: PaperTask, **kw: float | int | str) -> list[Message]:
    """The initial conversation of a paper rollout: a short system message + the instructions (both
    pinned: they open every context window)."""
    system = "You are an autonomous machine-learning research engineer. Use the tools to work in the sandbox."
    return [Message("system", system, pinned=True), Message("user", instructions(task, **kw), pinned=True)]  # type: ignore[arg-type]


def stage_task(task: PaperTask, dest: str | Path) -> Path:
    """Copy the agent-visible files of ``task`` to ``dest`` (created, made world-readable); idempotent."""
    dest = Path(dest)
    if (dest / "paper.md").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(AGENT_FILES, key=lambda n: n == "paper.md"):  # paper.md last: it marks a complete copy
        if (task.root / name).is_file():
            shutil.copyfile(task.root / name, dest / name)
    if task.assets:
        shutil.copytree(task.root / "assets", dest / "assets", dirs_exist_ok=True)
    for dirpath, _, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return dest


def staging_root(parent: str | Path | None = None) -> Path:
    """A new world-traversable directory for staged tasks (under the system temp dir by default: an
    output dir may be private, and bwrap's unprivileged uid must reach the bound paper). Remove it with
    ``shutil.rmtree`` when the run ends."""
    root = Path(tempfile.mkdtemp(prefix="klong-tasks-", dir=parent))
    os.chmod(root, 0o755)
    return root


def task_sandbox_config(cfg: SandboxConfig, staged: str | Path) -> SandboxConfig:
    """``cfg`` plus the read-only bind of a staged task at :data:`PAPER_DIR`."""
    return dataclasses.replace(cfg, ro_binds=[*cfg.ro_binds, f"{Path(staged).resolve()}:{PAPER_DIR}"])

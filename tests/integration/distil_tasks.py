"""Test-time task folders and the scripted judge rule for distillation tests and benchmarks (test helpers).

:func:`make_task` writes a small PaperBench-format task folder (paper.md, config.yaml, a three-leaf rubric);
:func:`judge_script` is a responder for the judge double (openai_judge_double.py) that grades execution
leaves on the REAL reproduce.log (written by reproduce.sh in a fresh sandbox) and code leaves on the files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

try:  # imported as a top-level module (tests/integration on sys.path) or as a package module
    from openai_agent_double import REAL_MARK
except ImportError:
    from tests.integration.openai_agent_double import REAL_MARK

GRADE = "# Expectations\nscripted\n# Reality\nscripted by the judge double\n# Score\n{}"


def judge_script(body: dict) -> str:
    """Execution/result leaves: 1 when the real reproduce.log shows the run; code leaves: 1 when main.py exists."""
    text = "\n".join(m["content"] for m in body["messages"])
    log = re.search(r"<reproduce\.log>\n(.*?)\n</reproduce\.log>", text, re.DOTALL)
    if log is None:
        return GRADE.format(1 if "main.py" in text else 0)
    return GRADE.format(1 if REAL_MARK in log.group(1) else 0)


def make_task(root: Path, name: str, title: str) -> Path:
    """A small task folder: a paper, one Code Development leaf and two Code Execution leaves."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"id: {name}\ntitle: {title}\n")
    (d / "paper.md").write_text(f"# {title}\n\nWe sum the numbers 0..9 and report the metric 45.\n")
    leaves = [("code", "Code Development", "main.py computes the metric"),
              ("run", "Code Execution", "reproduce.sh runs main.py"),
              ("log", "Code Execution", "the run writes results/metrics.json")]  # fmt: skip
    rubric = {"id": "root", "requirements": title, "weight": 1, "sub_tasks": [
        {"id": i, "requirements": r, "weight": 1, "sub_tasks": [], "task_category": c,
         "finegrained_task_category": "Experimental Setup"} for i, c, r in leaves]}  # fmt: skip
    (d / "rubric.json").write_text(json.dumps(rubric))
    return d

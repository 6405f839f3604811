"""Per-paper state of a factory run: the working directory, stage markers and recorded failures.

Layout under ``<output_dir>/papers/<paper_id>/``: the stage outputs (``paper.md``, ``meta.json``, ``filter.json``,
``rubric.json``, ``blacklist.txt``, ``addendum.md``) and one marker per stage, ``<stage>.done.json`` (the stage's
result summary) or ``<stage>.failed.json`` (``{"stage", "error"}``). Every file is written atomically (temp name,
then rename: klong_megatron/atomic.py), and a stage writes its marker last, so after a kill a marker means the
stage's outputs are complete. A failed stage is retried by the next run; a done one never is.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from klong_megatron.atomic import atomic_output

STAGES = ("collect", "filter", "rubric", "blacklist", "tasks", "distil")
"""Every stage, in run order."""
PAPER_STAGES = STAGES[:-1]
"""Stages with per-paper markers (distil keeps per-attempt records of its own, factory/distil.py)."""
_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str, max_len: int = 80) -> str:
    """A folder-safe id: runs of other characters become ``-`` (``2401.01234v2`` stays as it is)."""
    out = _ID_RE.sub("-", text).strip("-.")[:max_len].strip("-.")
    if not out:
        raise ValueError(f"cannot make a paper id from {text!r}")
    return out


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class PaperDir:
    """One paper's directory: its outputs and stage markers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paper_id = root.name

    def path(self, name: str) -> Path:
        return self.root / name

    def done(self, stage: str) -> dict[str, Any] | None:
        """The stage's recorded result, or None when it has not finished."""
        marker = self.root / f"{stage}.done.json"
        return json.loads(marker.read_text()) if marker.is_file() else None

    def failed(self, stage: str) -> str | None:
        marker = self.root / f"{stage}.failed.json"
        return json.loads(marker.read_text())["error"] if marker.is_file() else None

    def mark_done(self, stage: str, result: dict[str, Any]) -> None:
        """Record ``stage`` as finished (its outputs must already be written); clears an earlier failure."""
        write_json(self.root / f"{stage}.done.json", {"stage": stage, "time": time.time(), **result})
        (self.root / f"{stage}.failed.json").unlink(missing_ok=True)

    def mark_failed(self, stage: str, error: str) -> None:
        write_json(self.root / f"{stage}.failed.json", {"stage": stage, "time": time.time(), "error": error})

    def meta(self) -> dict[str, Any]:
        return json.loads(self.path("meta.json").read_text())


class Store:
    """The papers of one run (``<output_dir>/papers``), in id order."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)
        self.papers_dir = self.root / "papers"
        self.papers_dir.mkdir(parents=True, exist_ok=True)

    def paper(self, paper_id: str) -> PaperDir:
        return PaperDir(self.papers_dir / paper_id)

    def papers(self) -> list[PaperDir]:
        """Every collected paper that is not a duplicate of another."""
        out = [PaperDir(p) for p in sorted(self.papers_dir.iterdir()) if p.is_dir()]
        return [p for p in out if (d := p.done("collect")) is not None and not d.get("duplicate_of")]

    def ready_for(self, stage: str) -> list[PaperDir]:
        """Papers whose previous stages all finished (and the filter kept)."""
        prev = STAGES[: STAGES.index(stage)]
        out = []
        for p in self.papers():
            if any(p.done(s) is None for s in prev if s != "collect"):
                continue
            if "filter" in prev and not p.done("filter").get("keep"):
                continue
            out.append(p)
        return out

"""Grade cache keyed by (submission hash, leaf id, grader key, leaf fingerprint), in SQLite or in memory.

The fingerprint (hash of the leaf's requirements, category and check) is part of the key because
transforms keep ids: a leaf collapsed by ``collapse_deep`` keeps its id but asks something else. The grader
key (``LeafGrader.cache_key``) covers the rest: for the LLM grader the model, prompt texts, budgets, request
parameters (reasoning effort ...), the paper, both addenda and the preceding criteria, so that a changed
judge configuration never serves old grades.
Only valid grades are stored, so an invalid leaf is graded again next time. One SQLite file may be
shared by several judge processes (WAL mode; writes are single statements).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from klong_megatron.judge.base import LeafGrade
from klong_megatron.judge.rubric import TaskNode


def leaf_fingerprint(leaf: TaskNode) -> str:
    text = json.dumps([leaf.requirements, leaf.task_category, leaf.finegrained_task_category, leaf.check])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class GradeCache:
    """``path=None`` keeps grades in memory for the life of the object."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._mem: dict[tuple[str, str, str, str], str] = {}
        self._db: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS grades (submission TEXT, leaf TEXT, grader TEXT, fingerprint TEXT, "
                "grade TEXT, PRIMARY KEY (submission, leaf, grader, fingerprint))"
            )
            self._db.commit()

    def get(self, submission_hash: str, leaf: TaskNode, grader: str) -> LeafGrade | None:
        key = (submission_hash, leaf.id, grader, leaf_fingerprint(leaf))
        if self._db is None:
            raw = self._mem.get(key)
        else:
            row = self._db.execute(
                "SELECT grade FROM grades WHERE submission=? AND leaf=? AND grader=? AND fingerprint=?", key
            ).fetchone()
            raw = row[0] if row else None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return LeafGrade.from_dict({**json.loads(raw), "cached": True})

    def put_many(self, submission_hash: str, items: list[tuple[TaskNode, LeafGrade, str]]) -> None:
        """Store the valid grades of (leaf, grade, grader key) triples."""
        rows = [
            (submission_hash, leaf.id, key, leaf_fingerprint(leaf), json.dumps(g.to_dict()))
            for leaf, g, key in items
            if g.valid
        ]
        if self._db is None:
            self._mem.update({r[:4]: r[4] for r in rows})
            return
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO grades VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

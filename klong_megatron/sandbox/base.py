"""The sandbox contract: where an agent's tools run.

A sandbox is a bounded, isolated place with a writable work directory. Implementations (Docker,
bubblewrap) pass the same contract suite (tests/integration/test_sandbox_contract.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one command. ``exit_code`` is None when the command was killed by the timeout.

    ``truncated``: some output was dropped (the middle; head and tail are kept). ``oom_killed``: the
    backend confirmed an out-of-memory kill (Docker's cgroup counter); under rlimits (bwrap) an
    allocation fails inside the program instead (e.g. ``MemoryError`` on stderr).
    """

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float
    truncated: bool
    oom_killed: bool = False


@runtime_checkable
class Sandbox(Protocol):
    """Small on purpose: everything else (tools, judge checks) is built on these calls."""

    def start(self) -> None: ...

    def exec(
        self, cmd: str, *, timeout: float, cwd: str | None = None, env: dict[str, str] | None = None
    ) -> ExecResult: ...

    def write_file(self, path: str, data: bytes | str) -> None:
        """Create or overwrite a file under the work directory (relative paths start there)."""
        ...

    def read_file(self, path: str) -> bytes: ...

    def export(self, dest: str | Path) -> Path:
        """Copy the work directory to ``dest`` (a directory) and return it; the judge grades it."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...

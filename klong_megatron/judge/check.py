"""Check grader: a leaf's ``check`` shell command, run in a sandbox holding the submission; exit 0 scores 1.

Dataflow: submission files -> one tar archive unpacked in a fresh sandbox (any :class:`Sandbox`
backend: Docker, bubblewrap; the sandbox needs ``tar``) -> each leaf's ``check`` runs there in turn
(sharing that sandbox; checks should inspect, not depend on each other's side effects) -> exit code 0
-> 1.0, any other exit code or a timeout -> 0.0 with the command's output as the explanation.

A sandbox that crashes (an exception from the backend, not a failing command) is reported and the
remaining leaves are retried in a new sandbox, up to ``max_sandbox_attempts`` sandboxes; leaves still
ungraded then come back invalid. A leaf without a ``check`` command comes back invalid.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
from collections.abc import Callable, Sequence

from klong_megatron.judge.base import GradingTask, LeafGrade
from klong_megatron.judge.rubric import TaskNode
from klong_megatron.sandbox.base import ExecResult, Sandbox

log = logging.getLogger(__name__)
_ARCHIVE = ".judge-submission.tar"


class CheckGrader:
    """Grades leaves that carry a ``check`` command. ``make_sandbox`` returns a new, not yet started sandbox."""

    name = "check"

    def __init__(
        self,
        make_sandbox: Callable[[], Sandbox],
        *,
        timeout_s: float = 600.0,
        max_sandbox_attempts: int = 2,
        output_chars: int = 2000,
    ) -> None:
        self.make_sandbox = make_sandbox
        self.timeout_s = timeout_s
        self.max_sandbox_attempts = max_sandbox_attempts
        self.output_chars = output_chars

    async def grade(self, task: GradingTask, leaves: Sequence[TaskNode]) -> list[LeafGrade]:
        return await asyncio.to_thread(self._grade_sync, task, leaves)

    def cache_key(self, task: GradingTask, leaf: TaskNode) -> str:
        """The check command is in the leaf fingerprint; its time limit may change the outcome."""
        return f"{self.name}#timeout={self.timeout_s:g}"

    def _grade_sync(self, task: GradingTask, leaves: Sequence[TaskNode]) -> list[LeafGrade]:
        grades: dict[str, LeafGrade] = {}
        for leaf in leaves:
            if leaf.check is None:
                grades[leaf.id] = LeafGrade(leaf.id, None, "leaf has no 'check' command", self.name, False)
        todo = [leaf for leaf in leaves if leaf.id not in grades]
        errors: list[str] = []
        for attempt in range(1, self.max_sandbox_attempts + 1):
            if not todo:
                break
            try:
                with self.make_sandbox() as sandbox:
                    _copy_in(sandbox, task)
                    while todo:
                        leaf = todo[0]
                        result = sandbox.exec(leaf.check or "", timeout=self.timeout_s)
                        grades[leaf.id] = self._grade_of(leaf, result, attempt)
                        todo.pop(0)
            except Exception as e:  # a backend failure, not a failing check: report and retry the rest
                errors.append(f"sandbox attempt {attempt}: {type(e).__name__}: {e}")
                log.warning("check grader: sandbox failed (%s); %d leaves left", errors[-1], len(todo))
        for leaf in todo:
            msg = "check could not run: " + "; ".join(errors)
            grades[leaf.id] = LeafGrade(leaf.id, None, msg, self.name, False, self.max_sandbox_attempts)
        return [grades[leaf.id] for leaf in leaves]

    def _grade_of(self, leaf: TaskNode, r: ExecResult, attempt: int) -> LeafGrade:
        passed = r.exit_code == 0 and not r.timed_out
        status = "timed out" if r.timed_out else f"exit code {r.exit_code}"
        out = (r.stdout + r.stderr)[-self.output_chars :]
        explanation = f"`{leaf.check}`: {status}" + (f"\n{out}" if out.strip() else "")
        meta = {"exit_code": r.exit_code, "timed_out": r.timed_out, "duration_s": r.duration_s}
        return LeafGrade(leaf.id, 1.0 if passed else 0.0, explanation, self.name, True, attempt, meta=meta)


def _copy_in(sandbox: Sandbox, task: GradingTask) -> None:
    """Put the submission into the started sandbox's work directory: one tar archive, unpacked inside."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in task.submission.files:
            tar.add(task.submission.root / rel, arcname=rel, recursive=False)
    sandbox.write_file(_ARCHIVE, buf.getvalue())
    r = sandbox.exec(f"tar -xf {_ARCHIVE} && rm -f {_ARCHIVE}", timeout=300)
    if r.exit_code != 0:
        raise RuntimeError(f"could not unpack the submission in the sandbox: {r.stderr.strip()[-500:]}")

"""The reproduction step: run a submission's ``reproduce.sh`` from a clean copy in a fresh sandbox.

Dataflow (PaperBench ``paperbench/reproduce.py``, summarised in the task data's README)::

    agent's submission dir --tar (without top-level venv/.venv, agent-written reproduce.log/meta)-->
      fresh sandbox W/submission/ -> record start time (epoch s) -> cd W/submission &&
      bash reproduce.sh > reproduce.log 2>&1   (reproduce.timeout_s; killed on timeout)
      -> export W (modification times kept) -> ``dest``: the executed submission, with the REAL
      reproduce.log (+ a runner line: exit code / timeout) and reproduce.meta.json

``reproduce.meta.json``: ``exit_code`` (None when killed or not run), ``duration_s``, ``timed_out``,
``missing_script`` (nothing was run; the log says so), ``log_created_at`` (whole unix seconds, as
PaperBench's ``date +%s``; the run starts on that second boundary, so a file with ``mtime >=
log_created_at`` was written by the run and every uploaded file is older: the judge's Result Analysis
leaves see only the former). Clocks: the sandbox shares the host's clock. Costs up to 1 s per run.

Limits: the sandbox's ``max_file_mb`` caps files the run writes; the run has the sandbox's network
(``none`` by default; ``allowlist`` + ``pip_index_url`` for package installs).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from klong_megatron.config.reproduce import ReproduceConfig
from klong_megatron.judge.submission import REPRODUCE_LOG, REPRODUCE_META, REPRODUCE_SCRIPT
from klong_megatron.sandbox import make_sandbox
from klong_megatron.sandbox._common import SandboxError

_SKIP_TOP = {"venv", ".venv", REPRODUCE_LOG, REPRODUCE_META}
_STARTED = ".reproduce_started"


@dataclass(frozen=True)
class ReproduceMeta:
    """What the runner observed (the ``reproduce.meta.json`` contract shared with the judge)."""

    exit_code: int | None
    duration_s: float
    timed_out: bool
    missing_script: bool
    log_created_at: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pack(src: Path) -> bytes:
    """tar of ``src``, leaving out top-level venv/.venv and agent-written log/meta files. Modification
    times are kept but clamped to now: a file the agent dated into the future cannot pass for a result
    of the run."""
    now = int(time.time())

    def clamp(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = min(int(info.mtime), now)
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for child in sorted(src.iterdir()):
            if child.name not in _SKIP_TOP:
                tar.add(child, arcname=child.name, filter=clamp)
    return buf.getvalue()


def _write(dest: Path, meta: ReproduceMeta, log_tail: str | None) -> ReproduceMeta:
    if log_tail is not None:
        with open(dest / REPRODUCE_LOG, "a") as f:
            f.write(log_tail)
    (dest / REPRODUCE_META).write_text(json.dumps(meta.to_dict(), indent=1))
    return meta


def reproduce(submission: str | Path, dest: str | Path, cfg: ReproduceConfig) -> ReproduceMeta:
    """Run ``submission``'s reproduce.sh in a fresh ``cfg.sandbox``; the executed copy goes to ``dest``
    (replaced if present). Never modifies ``submission``. Raises SandboxError only when the sandbox
    itself fails (the caller may retry); a failing or hanging script is a recorded outcome."""
    src, dest = Path(submission), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"submission directory {str(src)!r} does not exist")
    shutil.rmtree(dest, ignore_errors=True)
    if not (src / REPRODUCE_SCRIPT).is_file():
        shutil.copytree(
            src, dest, symlinks=True, ignore=lambda d, names: [n for n in names if d == str(src) and n in _SKIP_TOP]
        )
        created = time.time()
        (dest / REPRODUCE_LOG).write_text(
            f"[reproduction] {REPRODUCE_SCRIPT} not found in the submission: nothing was run.\n"
        )
        return _write(dest, ReproduceMeta(None, 0.0, False, True, created), None)
    w = cfg.sandbox.workdir.rstrip("/")
    staging = dest.with_name(dest.name + ".export")
    shutil.rmtree(staging, ignore_errors=True)
    with make_sandbox(cfg.sandbox) as sb:
        sb.write_file(".submission.tar", _pack(src))
        unpack = f"mkdir -p {w}/submission && tar -xf {w}/.submission.tar -C {w}/submission && rm {w}/.submission.tar"
        up = sb.exec(unpack, timeout=cfg.upload_timeout_s)
        if up.exit_code != 0:
            raise SandboxError(f"reproduction: cannot unpack the submission in the sandbox: {up.stderr.strip()[-500:]}")
        run = sb.exec(
            f"cd {w}/submission && rm -rf venv .venv && t0=$(date +%s) && "
            f'while [ "$(date +%s)" = "$t0" ]; do sleep 0.02; done && date +%s > {w}/{_STARTED} && '
            f"exec bash {REPRODUCE_SCRIPT} > {REPRODUCE_LOG} 2>&1 < /dev/null",
            timeout=cfg.timeout_s,
        )
        sb.export(staging)
    try:
        created = float((staging / _STARTED).read_text().strip())
        (staging / "submission").rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (dest / REPRODUCE_LOG).exists():
        (dest / REPRODUCE_LOG).write_text("")
    if run.timed_out:
        tail = f"\n[reproduction] {REPRODUCE_SCRIPT} timed out after {cfg.timeout_s:.0f} s and was killed.\n"
    else:
        tail = f"\n[reproduction] {REPRODUCE_SCRIPT} exited with code {run.exit_code} after {run.duration_s:.1f} s.\n"
    meta = ReproduceMeta(
        None if run.timed_out else run.exit_code, round(run.duration_s, 3), run.timed_out, False, created
    )
    return _write(dest, meta, tail)


def read_meta(executed: str | Path) -> ReproduceMeta | None:
    """The reproduce.meta.json of an executed submission, or None when it has none."""
    path = Path(executed) / REPRODUCE_META
    return ReproduceMeta(**json.loads(path.read_text())) if path.is_file() else None

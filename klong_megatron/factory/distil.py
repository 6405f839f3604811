"""Research-Factory stage 6: distil teacher trajectories into SFT data by rejection sampling.

Dataflow::

    task folders x ``samples`` attempts -> klong-eval's runner with engine=chat (eval/runner.py): the teacher
      (any OpenAI-compatible endpoint with tools, rollout/chat.py) works in the same fresh paper sandbox, with
      the same tools, time budget, prompt and blacklist as the student (tasks/rollout.py, tasks/workspace.py);
      reasoning is kept when the endpoint returns ``reasoning_content``
      -> out/attempts/rollouts.jsonl (each finished attempt, appended + fsynced)
      -> reproduce.sh in a clean sandbox -> judge (eval/grading.py) -> out/attempts/results.jsonl
      | a try that failed (endpoint, sandbox, judge) -> retried, then out/attempts/failures.jsonl with the reasons
    -> select() (factory/select.py): blacklist / judge-invalid / threshold / near-duplicate / best k
      -> out/decisions.jsonl (one line per attempt: kept or the reason it was rejected)
    -> out/sft.jsonl: kept attempts as trajectory JSONL (``{"id", "messages", "tools", "meta"}``), what
       ``klong-data`` and ``klong-sft`` read (the prompt messages are pinned)
    -> datasheet (factory/datasheet.py) -> out/datasheet.json + out/datasheet.md

Resume: rerunning with the same ``out_dir`` never redoes a graded attempt (results.jsonl) nor re-runs the
teacher for an attempt already in rollouts.jsonl (it is only graded); a line torn by a kill is cut off.
Selection, SFT file and datasheet are recomputed from the stored attempts and written atomically, so a
kill never leaves a partial output and a changed threshold needs no new teacher calls.

Limits: a failed attempt is retried on the next run, not in this one (beyond ``max_attempts`` tries).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from klong_megatron.atomic import atomic_output
from klong_megatron.config.distil import DistilConfig
from klong_megatron.config.eval import EvalConfig
from klong_megatron.config.rollout import RolloutConfig
from klong_megatron.data.trajectory import parse_trajectory
from klong_megatron.factory.datasheet import build_datasheet, render_markdown
from klong_megatron.factory.select import Decision, select

log = logging.getLogger(__name__)

SFT_META = ("task", "sample", "reward", "finish_reason", "turns", "tokens", "prompt_tokens", "duration_s")
"""Attempt meta carried into the SFT records (provenance; the trainer ignores meta)."""


def eval_config(cfg: DistilConfig, task_dirs: list[str | Path], out: Path) -> EvalConfig:
    """The klong-eval run that produces and grades the attempts (engine=chat: the teacher)."""
    return EvalConfig(
        tasks=[str(d) for d in task_dirs], engine="chat", chat=cfg.teacher, sandbox=cfg.sandbox,
        rollout=RolloutConfig(tool_timeout_s=cfg.tool_timeout_s), reproduce=cfg.reproduce, judge=cfg.judge,
        samples=cfg.samples, concurrency=cfg.concurrency, time_limit_s=cfg.time_limit_s, max_turns=cfg.max_turns,
        max_attempts=cfg.max_attempts, max_invalid_frac=cfg.max_invalid_frac, output_dir=str(out), name="distil",
    )  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by this stage (missing file: none); a bad line names file:line."""
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
    return out


def sft_record(rec: dict[str, Any], teacher: str) -> dict[str, Any]:
    """A kept attempt as a trajectory JSONL record (validated by the trajectory parser)."""
    meta = rec.get("meta") or {}
    out = {"id": rec["id"], "messages": rec["messages"], "tools": meta.get("tools") or None,
           "meta": {"source": "distil", "teacher": teacher, **{k: meta[k] for k in SFT_META if k in meta}}}  # fmt: skip
    if out["tools"] is None:
        del out["tools"]
    return parse_trajectory(out, f"attempt {rec['id']}").to_json() | {"meta": out["meta"]}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def _student_tokens(cfg: DistilConfig, records: list[dict[str, Any]]) -> dict[str, int] | None:
    """Length of each kept trajectory in the student's tokens (its chat template, with the tools)."""
    if not cfg.tokenizer:
        return None
    from klong_megatron.data.dataset import load_tokenizer
    from klong_megatron.data.render import Renderer

    renderer = Renderer(load_tokenizer(cfg.tokenizer))
    return {r["id"]: len(renderer.render(parse_trajectory(r, f"sft record {r['id']}")).input_ids) for r in records}


def run_distil(
    cfg: DistilConfig, task_dirs: list[str | Path], out_dir: str | Path, *, progress: bool = False
) -> dict[str, Any]:
    """Run (or resume) the distillation of ``task_dirs`` into ``out_dir``; returns the datasheet (a dict).

    Writes ``out_dir/{sft.jsonl, decisions.jsonl, datasheet.json, datasheet.md}`` and keeps the attempts under
    ``out_dir/attempts``. Raises only for bad input (task folders, config); attempt failures are recorded.
    ``progress``: a progress bar of the attempts on stderr.
    """
    from tqdm import tqdm

    from klong_megatron.eval.runner import EvalRunner

    class Runner(EvalRunner):
        async def _job(self, *args: Any) -> None:
            await super()._job(*args)
            bar.update(1)
            bar.set_postfix(graded=self.stats.done + self.stats.skipped, failed=self.stats.failed, refresh=False)

    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(out_dir)
    attempts = out / "attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    runner = Runner(eval_config(cfg, task_dirs, attempts), attempts)
    with tqdm(total=len(runner.tasks) * cfg.samples, desc="distil", disable=not progress, file=sys.stderr) as bar:
        asyncio.run(runner.run())
    last_run = {k: v for k, v in runner.stats_dict().items() if k != "errors"}
    wanted = {f"{t}/{k}" for t in runner.tasks for k in range(cfg.samples)}
    graded = [r for r in read_jsonl(attempts / "results.jsonl") if r["id"] in wanted]
    done = {r["id"] for r in graded}
    failures: dict[str, dict[str, Any]] = {}
    for f in read_jsonl(attempts / "failures.jsonl"):  # the latest failure of each attempt still not graded
        if f["id"] in wanted and f["id"] not in done:
            failures[f["id"]] = f
    decisions = select(graded, min_score=cfg.min_score, best_k=cfg.best_k, dedupe_jaccard=cfg.dedupe_jaccard,
                       shingle_words=cfg.shingle_words, perm=cfg.minhash_perm, seed=cfg.seed)  # fmt: skip
    kept_ids = {d.id for d in decisions if d.kept}
    sft = [sft_record(r, cfg.teacher.model) for r in graded if r["id"] in kept_ids]
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "decisions.jsonl", [_decision_json(d) for d in decisions])
    sheet = build_datasheet(sorted(runner.tasks), cfg.samples, graded, list(failures.values()), decisions,
                            student_tokens=_student_tokens(cfg, sft), settings=_settings(cfg),
                            last_run=last_run)  # fmt: skip
    with atomic_output(out / "datasheet.json") as tmp:
        tmp.write_text(json.dumps(sheet, indent=1) + "\n", encoding="utf-8")
    with atomic_output(out / "datasheet.md") as tmp:
        tmp.write_text(render_markdown(sheet), encoding="utf-8")
    log.info("distil: %d attempts graded, %d failed, %d kept -> %s", len(graded), len(failures), len(sft), out)
    return sheet


def _decision_json(d: Decision) -> dict[str, Any]:
    out = {"id": d.id, "task": d.task, "score": d.score, "kept": d.kept, "reason": d.reason}
    if d.duplicate_of:
        out.update(duplicate_of=d.duplicate_of, similarity=d.similarity)
    return out


def _settings(cfg: DistilConfig) -> dict[str, Any]:
    return {"teacher": cfg.teacher.model, "samples": cfg.samples, "min_score": cfg.min_score, "best_k": cfg.best_k,
            "dedupe_jaccard": cfg.dedupe_jaccard, "time_limit_s": cfg.time_limit_s, "max_turns": cfg.max_turns,
            "sandbox": cfg.sandbox.backend, "tokenizer": cfg.tokenizer}  # fmt: skip

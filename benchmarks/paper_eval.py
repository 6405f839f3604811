"""Paper tasks end to end on CPU: reproduction step and judging per task, klong-eval throughput, project share.

    .venv/bin/python benchmarks/paper_eval.py [--backend bwrap|docker] [--concurrency 1 8 32] [--only repro|eval]

1. Per real PaperBench task (../shared/data/paperbench_tasks): wall time of the reproduction step
   (eval/reproduce.py: copy into a fresh sandbox, ``bash reproduce.sh`` of the scripted submission, export
   with mtimes; includes the up-to-1-s wait for a whole-second log creation time) and of judging the
   executed submission against the task's full rubric through the real judge pipeline (LLM grader, queue,
   cache off) with a zero-latency scripted judge double (no model).
2. klong-eval throughput (tasks/hour = graded samples per hour) with the zero-latency OpenAI-compatible
   model double of tests/ at concurrency 1, 8 and 32 (max(3, c) samples over the 3 tasks): each sample
   is a rollout of 9 tool calls in its own sandbox, the reproduction step and ~80 judge calls.
3. Per sample: mean rollout and grading (reproduction step + judge) wall time; for the c=8 run, the
   share of wall time that is self time of klong_megatron/ functions in the event-loop thread (cProfile:
   worker threads running sandbox calls, the doubles' server threads and the sandboxes' own processes are
   not counted; library code called from the project, e.g. httpx and json, is not project time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klong_megatron.config.chat import ChatEngineConfig  # noqa: E402
from klong_megatron.config.eval import EvalConfig  # noqa: E402
from klong_megatron.config.judge import JudgeConfig  # noqa: E402
from klong_megatron.config.reproduce import ReproduceConfig  # noqa: E402
from klong_megatron.config.sandbox import SandboxConfig  # noqa: E402
from klong_megatron.eval.reproduce import reproduce  # noqa: E402
from klong_megatron.eval.runner import EvalRunner  # noqa: E402
from klong_megatron.judge.factory import build_judge  # noqa: E402
from klong_megatron.tasks import find_task_dirs, load_paper_task  # noqa: E402
from tests.integration.openai_agent_double import MAIN_PY, OpenAIAgentDouble, PaperScript  # noqa: E402
from tests.integration.openai_judge_double import OpenAIJudgeDouble  # noqa: E402

TASKS = ROOT.parent / "shared" / "data" / "paperbench_tasks"
GRADE = "# Expectations\nx\n# Reality\ny\n# Score\n1"


def _judge_cfg(url: str, out: Path) -> JudgeConfig:
    return JudgeConfig(endpoints=[url], model="judge-double", use_checks=False, rank_files=False,
                       cache_path=None, state_dir=str(out / "queue"), max_attempts=1)  # fmt: skip


def bench_repro(backend: str) -> None:
    sandbox = SandboxConfig(backend=backend, memory_mb=2048)
    print(f"| task | leaves | reproduction ({backend}) | judging (zero-latency judge) | judge calls/s |")
    print("|---|---|---|---|---|")
    with OpenAIJudgeDouble(lambda body: GRADE, record=False) as jsrv, tempfile.TemporaryDirectory() as tmp:
        for d in find_task_dirs(TASKS):
            task = load_paper_task(d)
            sub = Path(tmp) / task.task_id / "submission"
            sub.mkdir(parents=True)
            (sub / "main.py").write_text(MAIN_PY)
            (sub / "reproduce.sh").write_text("set -e\npython3 main.py\n")
            t0 = time.perf_counter()
            reproduce(sub, sub.parent / "executed", ReproduceConfig(timeout_s=120, sandbox=sandbox))
            t_repro = time.perf_counter() - t0

            async def grade(task=task, sub=sub) -> float:
                judge, pool = build_judge(_judge_cfg(jsrv.url, Path(tmp) / task.task_id))
                async with judge:
                    t = time.perf_counter()
                    await judge.grade(sub.parent / "executed", task.rubric, paper=task.paper, priority="eval",
                                      addendum=task.judge_addendum_text)  # fmt: skip
                    dt = time.perf_counter() - t
                await pool.aclose()
                return dt

            t_judge = asyncio.run(grade())
            n = len(list(task.rubric.leaves()))
            print(f"| {task.task_id} | {n} | {t_repro:.2f} s | {t_judge:.2f} s | {n / t_judge:.0f} |")


def _eval_cfg(model_url: str, judge_url: str, out: Path, samples: int, c: int, backend: str) -> EvalConfig:
    sandbox = SandboxConfig(backend=backend, memory_mb=2048)
    return EvalConfig(
        tasks=[str(TASKS)], engine="chat", chat=ChatEngineConfig(base_url=model_url), sandbox=sandbox,
        reproduce=ReproduceConfig(timeout_s=120, sandbox=sandbox), judge=_judge_cfg(judge_url, out),
        samples=samples, concurrency=c, time_limit_s=600, max_turns=20, output_dir=str(out),
    )  # fmt: skip


def bench_eval(concurrency: list[int], backend: str) -> None:
    print(
        f"\n| concurrency | samples | wall | tasks/hour | rollout / grading per sample | project self time ({backend}) |"  # noqa: E501
    )
    print("|---|---|---|---|---|---|")
    for c in concurrency:
        samples = max(1, -(-max(3, c) // 3))
        with OpenAIAgentDouble(PaperScript()) as model, OpenAIJudgeDouble(lambda body: GRADE, record=False) as js, \
                tempfile.TemporaryDirectory() as tmp:  # fmt: skip
            runner = EvalRunner(_eval_cfg(model.url, js.url, Path(tmp), samples, c, backend), tmp)
            prof = cProfile.Profile() if c == 8 else None
            t0 = time.perf_counter()
            if prof is not None:
                prof.enable()
            trajs = asyncio.run(runner.run())
            if prof is not None:
                prof.disable()
            wall = time.perf_counter() - t0
            assert runner.stats.failed == 0, runner.stats.errors
            share = ""
            if prof is not None:
                stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
                own = sum(v[2] for k, v in stats.items() if "klong_megatron" in k[0])
                share = f"{own / wall:.1%} ({own:.1f} s self time)"
            st, n = runner.stats, max(len(trajs), 1)
            per = f"{st.rollout_s / n:.1f} s / {st.grade_s / n:.1f} s"
            print(f"| {c} | {len(trajs)} | {wall:.1f} s | {len(trajs) / wall * 3600:.0f} | {per} | {share} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="bwrap", choices=("bwrap", "docker"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--only", choices=("repro", "eval"))
    args = ap.parse_args()
    if args.only != "eval":
        bench_repro(args.backend)
    if args.only != "repro":
        bench_eval(args.concurrency, args.backend)


if __name__ == "__main__":
    main()

"""A toy long-horizon task family and a scripted expert that solves it through tool calls.

Each task is a small Markdown "paper" that defines K integer functions (``f1``..``fK``, simple
arithmetic formulas hidden among filler prose) and asks for ``results.json`` with every function
applied to given inputs. The scripted expert reads the paper in <= 50-line chunks, writes one module
per function, runs it, sometimes makes a slip and fixes it with ``edit_file``, writes ``run.py`` and
``reproduce.sh``, runs them and submits: 50-500 turns, far longer than a small context window.

Tool observations are computed here (the formulas are evaluated in Python) in the same text format
the sandbox tools return; the rubric (PaperBench tree with ``check`` leaves) grades a real submission.
Run ``python -m klong_megatron.data.demo_tasks --out FILE --num N`` to regenerate the bundled set.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klong_megatron.data.trajectory import Message, ToolCall, Trajectory, write_jsonl

DEMO_TRAJECTORIES = Path(__file__).resolve().parent / "assets" / "demo_trajectories.jsonl"

SYSTEM_PROMPT = (
    "You are an autonomous research engineer working in a sandbox with tools: bash, python, "
    "read_file_chunk, write_file, edit_file and submit. Reproduce the paper in /home/paper.md by "
    "writing code under /home/submission. Work step by step; call submit when done."
)

_FORMS = [
    ("{a} * x + {b}", lambda a, b: lambda x: a * x + b),
    ("x * x - {a} * x + {b}", lambda a, b: lambda x: x * x - a * x + b),
    ("({a} * x) % {m}", lambda a, b: lambda x: (a * x) % (b + 2)),
    ("max(x - {a}, {b})", lambda a, b: lambda x: max(x - a, b)),
    ("x // {m} + {a}", lambda a, b: lambda x: x // (b + 2) + a),
]
_FILLER = [
    "Prior work studied related transforms in depth; we refer the reader to the appendix for details.",
    "All experiments are deterministic and run on a single CPU core in under a second.",
    "We note that the transform is applied element-wise and independently to every input.",
    "The ablation in Section 5 confirms that each component matters for the final results.",
    "Reproducibility: the authors release no code; the formulas in this paper are complete.",
]


@dataclass
class DemoFunction:
    name: str
    formula: str
    fn: Any

    def source(self, slip: bool = False) -> str:
        body = re.sub(r"\bx\b", "(x + 1)", self.formula) if slip else self.formula
        return f"def {self.name}(x: int) -> int:\n    return {body}\n"


@dataclass
class DemoTask:
    task_id: str
    functions: list[DemoFunction]
    inputs: list[int]
    paper: str

    def results(self) -> dict[str, list[int]]:
        return {f.name: [f.fn(x) for x in self.inputs] for f in self.functions}

    def rubric(self) -> dict[str, Any]:
        """PaperBench-style rubric whose leaves carry deterministic ``check`` commands."""
        leaves = [
            {
                "id": f"{self.task_id}-{f.name}",
                "requirements": f"{f.name} is implemented as in the paper.",
                "weight": 1,
                "sub_tasks": [],
                "task_category": "Code Development",
                "finegrained_task_category": "Method Implementation",
                "check": f"cd /home/submission && python3 -c 'from {f.name} import {f.name}; "
                f"assert [{f.name}(x) for x in {self.inputs}] == {[f.fn(x) for x in self.inputs]}'",
            }
            for f in self.functions
        ]
        result_leaf = {
            "id": f"{self.task_id}-results",
            "requirements": "results.json holds every function applied to the inputs.",
            "weight": max(1, len(self.functions) // 2),
            "sub_tasks": [],
            "task_category": "Result Analysis",
            "finegrained_task_category": "Logging, Analysis & Presentation",
            "check": "cd /home/submission && python3 -c 'import json; "
            f'assert json.load(open("results.json")) == {json.dumps(self.results())}\'',
        }
        return {
            "id": self.task_id,
            "requirements": "The paper's functions and results are reproduced.",
            "weight": 1,
            "sub_tasks": [
                {"id": f"{self.task_id}-code", "requirements": "Functions", "weight": 2, "sub_tasks": leaves},
                result_leaf,
            ],
        }


def make_task(seed: int, num_functions: int) -> DemoTask:
    rng = random.Random(seed)
    functions = []
    for k in range(1, num_functions + 1):
        template, make = rng.choice(_FORMS)
        a, b = rng.randint(1, 9), rng.randint(0, 9)
        formula = template.format(a=a, b=b, m=b + 2)
        functions.append(DemoFunction(f"f{k}", formula, make(a, b)))
    inputs = sorted(rng.sample(range(-20, 50), 6))
    lines = [f"# Integer transforms, study {seed}", "", "## Abstract", "", rng.choice(_FILLER), ""]
    for f in functions:
        lines += [f"## Transform {f.name}", "", rng.choice(_FILLER), f"We define `{f.name}(x) = {f.formula}`.", ""]
    lines += [
        "## Results",
        "",
        f"Report every transform applied to the inputs {inputs} in results.json,",
        "a JSON object mapping each function name to its list of outputs.",
        "",
    ]
    return DemoTask(f"demo-{seed}", functions, inputs, "\n".join(lines))


class _Script:
    """Builds the expert's messages: one assistant tool call + its tool observation per turn."""

    def __init__(self, rng: random.Random):
        self.rng, self.messages, self.calls = rng, [], 0

    def turn(self, thought: str, tool: str, args: dict[str, Any], observation: str) -> None:
        self.calls += 1
        call_id = f"call_{self.calls}"
        self.messages.append(Message("assistant", thought, tool_calls=(ToolCall(tool, json.dumps(args), call_id),)))
        self.messages.append(Message("tool", observation, tool_call_id=call_id, name=tool))


def expert_trajectory(task: DemoTask, seed: int, slip_rate: float = 0.25) -> Trajectory:
    """A successful solution of ``task`` as a trajectory of tool calls."""
    rng = random.Random(seed)
    s = _Script(rng)
    paper_lines = task.paper.split("\n")
    for start in range(1, len(paper_lines) + 1, 50):
        chunk = paper_lines[start - 1 : start + 49]
        listing = "\n".join(f"{start + i}: {line}" for i, line in enumerate(chunk))
        s.turn(
            "Reading the paper.",
            "read_file_chunk",
            {"file": "/home/paper.md", "start_line": start, "max_lines": 50},
            listing,
        )
    s.turn(
        "Setting up the submission directory.",
        "bash",
        {"cmd": "mkdir -p /home/submission && ls /home"},
        "paper.md\nsubmission\n[exit code 0]",
    )
    for f in task.functions:
        path = f"/home/submission/{f.name}.py"
        slip = rng.random() < slip_rate
        s.turn(
            f"Implementing {f.name}(x) = {f.formula}.",
            "write_file",
            {"path": path, "content": f.source(slip)},
            f"Wrote {len(f.source(slip))} bytes to {path}",
        )
        x = task.inputs[0]
        check = f"cd /home/submission && python3 -c 'from {f.name} import {f.name}; print({f.name}({x}))'"
        got = f.fn(x + 1) if slip else f.fn(x)
        s.turn(
            f"Checking {f.name}({x}); the paper's formula gives {f.fn(x)}.",
            "bash",
            {"cmd": check},
            f"{got}\n[exit code 0]",
        )
        if slip:
            s.turn(
                f"{got} is wrong: I shifted x. Fixing {f.name}.",
                "edit_file",
                {"path": path, "old_str": f.source(True).split("return ")[1].strip(), "new_str": f.formula},
                f"Edited {path}: 1 replacement",
            )
            s.turn(f"Re-checking {f.name}({x}).", "bash", {"cmd": check}, f"{f.fn(x)}\n[exit code 0]")
    run_py = (
        "import json\n"
        + "".join(f"from {f.name} import {f.name}\n" for f in task.functions)
        + f"INPUTS = {task.inputs}\n"
        + "FUNCS = ["
        + ", ".join(f.name for f in task.functions)
        + "]\n"
        + "json.dump({f.__name__: [f(x) for x in INPUTS] for f in FUNCS}, open('results.json', 'w'))\n"
    )
    s.turn(
        "Writing the script that produces results.json.",
        "write_file",
        {"path": "/home/submission/run.py", "content": run_py},
        f"Wrote {len(run_py)} bytes",
    )
    s.turn(
        "Writing reproduce.sh.",
        "write_file",
        {"path": "/home/submission/reproduce.sh", "content": "#!/bin/bash\nset -e\npython3 run.py\n"},
        "Wrote 35 bytes",
    )
    s.turn(
        "Running the reproduction.",
        "bash",
        {"cmd": "cd /home/submission && bash reproduce.sh && cat results.json"},
        json.dumps(task.results()) + "\n[exit code 0]",
    )
    s.turn(
        "All transforms match the paper; submitting.",
        "submit",
        {"summary": "Implemented all transforms."},
        "Submission received.",
    )
    user = Message(
        "user",
        f"Task {task.task_id}: reproduce the paper in /home/paper.md. "
        "Produce results.json as the paper describes, and a reproduce.sh that regenerates it.",
    )
    messages = [Message("system", SYSTEM_PROMPT), user, *s.messages]
    return Trajectory(
        task.task_id, messages, {"source": "scripted-expert", "turns": s.calls, "num_functions": len(task.functions)}
    )


def demo_set(num: int, seed: int = 0, min_functions: int = 18, max_functions: int = 190) -> list[Trajectory]:
    """``num`` expert trajectories with function counts spread over [min_functions, max_functions]."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        k = rng.randint(min_functions, max_functions)
        out.append(expert_trajectory(make_task(seed * 100_000 + i, k), seed=seed * 100_000 + i))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Generate scripted-expert demo trajectories (JSONL).")
    ap.add_argument("--out", default=str(DEMO_TRAJECTORIES))
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = write_jsonl(args.out, (t.to_json() for t in demo_set(args.num, args.seed)))
    print(f"wrote {n} trajectories to {args.out}")


if __name__ == "__main__":
    main()

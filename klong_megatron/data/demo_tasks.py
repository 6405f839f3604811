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
NUM_FORMS = len(_FORMS)
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
        """PaperBench-style rubric whose leaves carry deterministic ``check`` commands.

        Graded like a PaperBench tree: per function "defined" (importable, weight 1), "at-zero" (f(0) is
        the paper's value, weight 1) and "correct" (all inputs, weight 2) under Code Development;
        reproduce.sh runs and writes results.json (Execution); results.json equals the paper's numbers
        (Result Analysis). A submission with the right workflow but wrong formulas earns partial credit,
        and one that gets the formula's constant right earns a little more: a graded signal for RL.
        """
        sub = "cd /home/submission && "
        functions = []
        for f in self.functions:
            want = [f.fn(x) for x in self.inputs]
            imp = f"{sub}python3 -c 'from {f.name} import {f.name}; "
            defined = f"{imp}assert callable({f.name})'"
            at_zero = f"{imp}assert {f.name}(0) == {f.fn(0)}'"
            correct = f"{imp}assert [{f.name}(x) for x in {self.inputs}] == {want}'"
            functions.append(
                _node(f"{self.task_id}-{f.name}", f"{f.name} is implemented as in the paper.", 1, [
                    _leaf(f"{self.task_id}-{f.name}-defined", f"{f.name}.py defines {f.name}.", 1, defined,
                          "Code Development", "Method Implementation"),
                    _leaf(f"{self.task_id}-{f.name}-at-zero", f"{f.name}(0) equals the paper's value.", 1, at_zero,
                          "Code Development", "Method Implementation"),
                    _leaf(f"{self.task_id}-{f.name}-correct", f"{f.name} matches the paper's formula.", 2, correct,
                          "Code Development", "Method Implementation"),
                ])
            )  # fmt: skip
        runs = f"{sub}rm -f results.json && timeout 20 bash reproduce.sh && test -s results.json"
        matches = (
            f"{sub}python3 -c 'import json; assert json.load(open(\"results.json\")) == {json.dumps(self.results())}'"
        )
        return _node(self.task_id, "The paper's functions and results are reproduced.", 1, [
            _node(f"{self.task_id}-code", "Functions", 2, functions),
            _leaf(f"{self.task_id}-runs", "reproduce.sh runs and writes results.json.", 1, runs,
                  "Code Execution", "Experimental Setup"),
            _leaf(f"{self.task_id}-results", "results.json holds every function applied to the inputs.", 1, matches,
                  "Result Analysis", "Logging, Analysis & Presentation"),
        ])  # fmt: skip

    def files(self) -> dict[str, str]:
        """Files the agent's sandbox starts with (paths relative to its work dir, ``/home``)."""
        return {"paper.md": self.paper}

    def prompt(self) -> list[Message]:
        """The initial conversation of a rollout on this task (system prompt + task)."""
        return [Message("system", SYSTEM_PROMPT), Message("user", _task_text(self.task_id))]


def _node(node_id: str, requirements: str, weight: int, sub_tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": node_id, "requirements": requirements, "weight": weight, "sub_tasks": sub_tasks}


def _leaf(node_id: str, requirements: str, weight: int, check: str, category: str, fine: str) -> dict[str, Any]:
    leaf = _node(node_id, requirements, weight, [])
    return leaf | {"task_category": category, "finegrained_task_category": fine, "check": check}


def _task_text(task_id: str) -> str:
    return (
        f"Task {task_id}: reproduce the paper in /home/paper.md. "
        "Produce results.json as the paper describes, and a reproduce.sh that regenerates it."
    )


def make_task(seed: int, num_functions: int, forms: int = NUM_FORMS) -> DemoTask:
    """A paper of ``num_functions`` transforms, each drawn from the first ``forms`` formula templates
    (1: only ``a * x + b``, the easiest to reproduce); a pure function of the arguments."""
    if not 1 <= forms <= NUM_FORMS:
        raise ValueError(f"forms must be in [1, {NUM_FORMS}], got {forms}")
    rng = random.Random(seed)
    functions = []
    for k in range(1, num_functions + 1):
        template, make = rng.choice(_FORMS[:forms])
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


def expert_trajectory(task: DemoTask, seed: int, slip_rate: float = 0.25, skip_rate: float = 0.0) -> Trajectory:
    """A solution of ``task`` as a trajectory of tool calls.

    Tool names, argument names and observation texts are those of ``klong_megatron.sandbox.tools``
    (work dir ``/home``), so a policy that imitates the expert runs unchanged in a real sandbox.
    With probability ``skip_rate`` the expert submits right after checking its functions, skipping
    ``run.py``, ``reproduce.sh`` and ``results.json``: a mistake the rubric's Execution and Result
    Analysis leaves punish, which SFT imitates and RL can remove (``meta.skipped_reproduction``).
    """
    if not 0.0 <= skip_rate <= 1.0:
        raise ValueError(f"skip_rate must be in [0, 1], got {skip_rate}")
    skip = random.Random(f"skip:{seed}").random() < skip_rate  # own stream: skip_rate=0 keeps the old data
    rng = random.Random(seed)
    s = _Script(rng)
    paper_lines = task.paper.splitlines()
    for start in range(1, len(paper_lines) + 1, 50):
        chunk = paper_lines[start - 1 : start + 49]
        body = "\n".join(f"{start + i:6d}\t{line}" for i, line in enumerate(chunk))
        end = start + len(chunk) - 1
        s.turn(
            "Reading the paper.",
            "read_file_chunk",
            {"file": "/home/paper.md", "start_line": start, "max_lines": 50},
            f"[/home/paper.md: lines {start}-{end} of {len(paper_lines)}]\n{body}",
        )
    s.turn(
        "Setting up the submission directory.",
        "bash",
        {"command": "mkdir -p /home/submission && ls /home"},
        "paper.md\nsubmission\n[exit code 0]",
    )

    def write(thought: str, path: str, content: str) -> None:
        s.turn(thought, "write_file", {"file": path, "content": content},
               f"Wrote {len(content.encode())} bytes to {path}.")  # fmt: skip

    for f in task.functions:
        path = f"/home/submission/{f.name}.py"
        slip = rng.random() < slip_rate
        write(f"Implementing {f.name}(x) = {f.formula}.", path, f.source(slip))
        x = task.inputs[0]
        check = f"cd /home/submission && python3 -c 'from {f.name} import {f.name}; print({f.name}({x}))'"
        got = f.fn(x + 1) if slip else f.fn(x)
        s.turn(f"Checking {f.name}({x}); the paper's formula gives {f.fn(x)}.", "bash", {"command": check},
               f"{got}\n[exit code 0]")  # fmt: skip
        if slip:
            old = f.source(True).split("return ")[1].strip()
            s.turn(
                f"{got} is wrong: I shifted x. Fixing {f.name}.",
                "edit_file",
                {"file": path, "old_str": old, "new_str": f.formula},
                f"Edited {path} at line 2: replaced {len(old)} chars by {len(f.formula)}.",
            )
            s.turn(f"Re-checking {f.name}({x}).", "bash", {"command": check}, f"{f.fn(x)}\n[exit code 0]")
    if not skip:
        _reproduce(task, s, write)
    s.turn(
        "All transforms match the paper; submitting.",
        "submit",
        {"summary": "Implemented all transforms."},
        "Submitted. Your work directory will now be graded.",
    )
    meta = {"source": "scripted-expert", "turns": s.calls, "num_functions": len(task.functions)}
    if skip:
        meta["skipped_reproduction"] = True
    return Trajectory(task.task_id, [*task.prompt(), *s.messages], meta)


def _reproduce(task: DemoTask, s: _Script, write: Any) -> None:
    """The expert's last steps before submitting: run.py, reproduce.sh, and running them."""
    run_py = (
        "import json\n"
        + "".join(f"from {f.name} import {f.name}\n" for f in task.functions)
        + f"INPUTS = {task.inputs}\n"
        + "FUNCS = ["
        + ", ".join(f.name for f in task.functions)
        + "]\n"
        + "json.dump({f.__name__: [f(x) for x in INPUTS] for f in FUNCS}, open('results.json', 'w'))\n"
    )
    write("Writing the script that produces results.json.", "/home/submission/run.py", run_py)
    write("Writing reproduce.sh.", "/home/submission/reproduce.sh", "#!/bin/bash\nset -e\npython3 run.py\n")
    s.turn(
        "Running the reproduction.",
        "bash",
        {"command": "cd /home/submission && bash reproduce.sh && cat results.json"},
        json.dumps(task.results()) + "\n[exit code 0]",
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

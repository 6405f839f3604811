"""Judge prompts and robust reply parsing (no I/O).

Grading prompt (one per leaf): paper (Markdown), addendum, the selected submission files (already cut
to a token budget), reproduce.sh and its log for Code Execution / Result Analysis leaves, the preceding
criteria (the path from the rubric root down to the leaf), the criterion and its category's question.
Reply contract: a JSON object ``{"explanation": str, "score": 0 | 1}``; ``Score: 1`` lines are accepted
too (:func:`parse_grade`). File ranking prompt: the file tree and the criterion -> a JSON list of paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from klong_megatron.judge.rubric import TaskNode

SYSTEM = (
    "You are an expert reviewer grading an attempt to reproduce a machine-learning research paper. "
    "You judge ONE criterion of a grading rubric at a time, strictly and only on the evidence shown: "
    "the submission's files and, where relevant, the log of running its reproduce.sh script. "
    "Descriptions, plans or TODOs do not satisfy a criterion; working code and real outputs do."
)

QUESTIONS = {
    "Code Development": (
        "Does the submission contain a correct implementation of this criterion? Code that is written but "
        "not executed is acceptable; mere instructions, descriptions or stubs are not."
    ),
    "Code Execution": (
        "Does running reproduce.sh (see its log) successfully execute what this criterion asks for? "
        "Look for evidence in the log that the relevant code ran to completion."
    ),
    "Result Analysis": (
        "Do the outputs produced by running reproduce.sh show that this result has been reproduced? "
        "Judge the numbers and artifacts in the log and the produced files, not claims in a README."
    ),
}

REPLY_FORMAT = (
    'Reply with a JSON object only: {"explanation": "<your reasoning, citing files or log lines>", '
    '"score": 0 or 1} where 1 means the criterion is met.'
)

RANK_SYSTEM = "You help a reviewer find the files of a code submission that matter for one grading criterion."


def execution_leaf(leaf: TaskNode) -> bool:
    """True for leaves whose grading needs reproduce.sh and its log."""
    return leaf.task_category in ("Code Execution", "Result Analysis")


def grading_messages(
    leaf: TaskNode,
    ancestors: Sequence[TaskNode],
    *,
    paper: str,
    addendum: str,
    files: Sequence[tuple[str, str]],
    reproduce_script: str | None,
    reproduce_log: str | None,
) -> list[dict[str, str]]:
    """Chat messages grading ``leaf``; ``files`` are (path, text) pairs already cut to the budget."""
    parts = [f"# Paper\n\n{paper or '(not provided)'}"]
    if addendum:
        parts.append(f"# Addendum to the paper\n\n{addendum}")
    listing = "\n\n".join(f"## File: {path}\n```\n{text}\n```" for path, text in files)
    parts.append(f"# Submission files (most relevant first)\n\n{listing or '(no readable files)'}")
    if execution_leaf(leaf):
        parts.append(f"# reproduce.sh\n\n```\n{reproduce_script if reproduce_script is not None else '(missing)'}\n```")
        parts.append(f"# reproduce.log\n\n```\n{reproduce_log if reproduce_log is not None else '(missing)'}\n```")
    chain = "\n".join(f"{'  ' * i}- {node.requirements}" for i, node in enumerate(ancestors))
    parts.append(f"# Preceding criteria (from the top of the rubric down to this one)\n\n{chain or '(none)'}")
    category = leaf.task_category or "Code Development"
    fine = f" / {leaf.finegrained_task_category}" if leaf.finegrained_task_category else ""
    parts.append(
        f"# Criterion to grade\n\n{leaf.requirements}\n\nCategory: {category}{fine}\n"
        f"Question: {QUESTIONS[category]}\n\n{REPLY_FORMAT}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def repair_messages(messages: list[dict[str, str]], bad_reply: str) -> list[dict[str, str]]:
    """The conversation extended with the unparseable reply and a request to answer in the format."""
    return [
        *messages,
        {"role": "assistant", "content": bad_reply},
        {"role": "user", "content": f"Your reply could not be parsed. {REPLY_FORMAT}"},
    ]


def ranking_messages(leaf: TaskNode, tree: str, max_files: int) -> list[dict[str, str]]:
    user = (
        f"# Criterion\n\n{leaf.requirements}\n\n# Files of the submission\n\n{tree}\n\n"
        f"List up to {max_files} files needed to grade this criterion, most relevant first. "
        'Reply with a JSON list of paths only, e.g. ["src/train.py", "README.md"].'
    )
    return [{"role": "system", "content": RANK_SYSTEM}, {"role": "user", "content": user}]


class ReplyParseError(ValueError):
    """A judge reply without a recognisable 0/1 score."""


_SCORE_LINE = re.compile(r"\bscore\b\W{0,6}([01](?:\.0+)?)(?!\.?\d)", re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _objects(text: str) -> list[object]:
    """Every JSON value decodable at a '{' or '[' in ``text`` (fenced blocks first)."""
    found: list[object] = []
    decoder = json.JSONDecoder()
    for chunk in [*_FENCE.findall(text), text]:
        for i, ch in enumerate(chunk):
            if ch in "{[":
                try:
                    found.append(decoder.raw_decode(chunk, i)[0])
                except json.JSONDecodeError:
                    continue
    return found


def _as_binary(value: object) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1", "0.0", "1.0"):
        return int(float(value))
    return None


def parse_grade(text: str) -> tuple[int, str]:
    """(score in {0, 1}, explanation) from a reply: a JSON object with "score", else the last "Score: x"."""
    for obj in _objects(text):
        if isinstance(obj, dict):
            key = next((k for k in obj if str(k).lower() == "score"), None)
            if key is not None and (s := _as_binary(obj[key])) is not None:
                return s, str(obj.get("explanation", obj.get("Explanation", ""))).strip()
    matches = _SCORE_LINE.findall(text)
    if matches:
        explanation = "\n".join(line for line in text.splitlines() if not _SCORE_LINE.search(line)).strip()
        return int(float(matches[-1])), explanation
    raise ReplyParseError(f"no 0/1 score in reply: {text[:200]!r}")


def parse_ranking(text: str, known: Sequence[str]) -> list[str]:
    """Paths from a ranking reply that exist in ``known``, in the reply's order, without duplicates."""
    valid = set(known)
    candidates: list[str] = []
    lists = [o for o in _objects(text) if isinstance(o, list)]
    if lists:
        candidates = [str(p) for p in lists[0]]
    else:
        candidates = [line.strip(" -*`'\"\t") for line in text.splitlines()]
    out: list[str] = []
    for p in candidates:
        p = p.removeprefix("./")
        if p in valid and p not in out:
            out.append(p)
    return out

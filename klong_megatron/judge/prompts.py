"""Judge prompts and strict reply parsing (no I/O), in the structure of PaperBench's judge.

Source followed: openai/preparedness ``project/paperbench/paperbench/judge/constants.py`` (task prompt, criterion
prompt, grading prompt, file-ranking prompt), ``judge/simple.py`` (message order, the structured parse call) and
``rubric/tasks.py`` (``TASK_CATEGORY_QUESTIONS``, quoted: their exact wording is what the judge is calibrated on).
The other texts are in our own words with the same content.

Grading request (one per leaf): system = the task; then user messages: the paper, the joined addenda (or "(no
addendum given)"), the selected files, ``reproduce.sh`` (every category unless code-only), ``reproduce.log``
(Code Execution and Result Analysis), the preceding criteria plus the criterion and its category's question, and
the answer format: three sections "# Expectations", "# Reality", "# Score" (0 or 1).
Parse: :func:`parse_grade` reads the "# Score" section strictly (exactly one of 0/1 stated; a JSON object with a
"score" is accepted too); when it cannot, :func:`parse_messages` + :data:`GRADE_SCHEMA` ask the model for a
structured object (``valid_score``, ``score``, ``explanation``), PaperBench's second call.
Ranking request: the paper, addenda, criterion and the file tree -> newline-separated paths, most relevant first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from klong_megatron.judge.rubric import TaskNode

NO_ADDENDUM = "(NO ADDENDUM GIVEN)"

QUESTIONS = {
    "Code Development": (
        "Does the code in the submission contain a correct implementation of this? Note: mere instructions or "
        "descriptions of implementations are not sufficient; you should check whether there is actual code that "
        "implements the requirement."
    ),
    "Code Execution": "Does running the reproduce.sh script lead to this being successfully executed?",
    "Result Analysis": "Did the reproduce.sh script execution produce evidence that agrees with these results?",
}


def task_prompt(code_only: bool) -> str:
    """The system prompt: what is being judged and how the evidence was produced."""
    text = (
        "You are judging a candidate's attempt to reproduce a research paper.\n\n"
        "First you get the paper: read it carefully, it is the ground truth for what a correct implementation "
        "and reproduction is. Then you get the candidate's submission: a set of files that attempts to reproduce "
        "the paper."
    )
    if not code_only:
        text += (
            " The candidate was asked to include a `reproduce.sh` script that runs the whole reproduction and "
            "produces all the results of the paper. If the script exists, we have already run it and included "
            "its output log as `reproduce.log`; other files the script produced (results, plots, artifacts) may "
            "be present too. If `reproduce.sh` or `reproduce.log` is missing, treat every criterion that relies "
            "on it as failed."
        )
    return text + (
        "\n\nA rubric breaks the paper down into fine-grained criteria. Your task is to check the submission and "
        "its outputs against ONE specific criterion of this rubric."
    )


GRADING_FORMAT = (
    "Now evaluate the submission above against the criterion.\n\n"
    "Answer in 3 parts:\n\n"
    "# Expectations\n"
    "From the paper, identify the parts that matter for this criterion. Describe what a correct "
    "resolution looks like and what exactly you will look for in the submission.\n\n"
    "# Reality\n"
    "Go through the submission's files and output logs for the parts relevant to the criterion. Compare "
    "them with your expectations and say whether the attempt meets the criterion. Describe only what you "
    "were given, and name the files you refer to.\n\n"
    "# Score\n"
    "Reason about whether the criterion is met. Give a score of either 0 or 1 depending on whether the "
    "criterion has been met, and explain why.\n\n"
    "Notes:\n"
    "- Always give a score. State any uncertainty in your discussion.\n"
    "- You were given all the files and logs of the attempt. Anything that seems missing was not "
    "produced: treat it as a failure.\n"
    "- Be strict and thorough on this criterion, but do not check things outside its scope."
)

RANK_SYSTEM = (
    "You are judging an attempt to reproduce a research paper. You will be shown the paper, one resolution "
    "criterion (a specific aspect of the paper being marked) and the files of someone's submission that attempts "
    "to reproduce the paper. Find the files that matter most for this criterion, so that they can be read to "
    "judge it. You get a tree of the submission; answer with file paths, one per line, most important first, "
    "each the full path. List every file shown to you, leave none out, and write nothing else."
)

PARSE_SYSTEM = (
    "You are given the output of a judge that should contain a score and an explanation. Turn it into a "
    "structured object with `valid_score` (whether the output contains a valid score), `score` (either 0 or 1) "
    "and `explanation` (a short summary of the judge's reasoning). If the output contains no valid score, set "
    "`valid_score` to false and `score` to 0."
)

GRADE_SCHEMA = {
    "type": "object",
    "properties": {
        "valid_score": {"type": "boolean"},
        "score": {"type": "integer", "enum": [0, 1]},
        "explanation": {"type": "string"},
    },
    "required": ["valid_score", "score", "explanation"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "judge_grade", "schema": GRADE_SCHEMA, "strict": True},
}
"""OpenAI ``response_format`` of the parse call (SGLang and vLLM constrain decoding to the schema)."""


def joined_addendum(addendum: str, judge_addendum: str) -> str:
    """``addendum.md`` and ``judge.addendum.md`` joined as PaperBench joins them (simple.py)."""
    return f"{addendum}\n{judge_addendum}".strip() or NO_ADDENDUM


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def grading_messages(
    leaf: TaskNode,
    prior: Sequence[TaskNode],
    *,
    paper: str,
    addendum: str,
    files: str,
    reproduce_script: str | None,
    reproduce_log: str | None,
    code_only: bool = False,
) -> list[dict[str, str]]:
    """Chat messages grading ``leaf``; ``files`` is the packed file text, ``addendum`` the joined addenda."""
    category = leaf.task_category or "Code Development"
    if category == "Result Analysis":
        intro = "Here are the most relevant docs and the files touched (modified or created) while reproduce.sh ran"
    else:
        intro = "Here are the most relevant files of the submission"
    messages = [
        {"role": "system", "content": task_prompt(code_only)},
        _user(f"The paper is below:\n{paper}"),
        _user(
            "If the paper comes with an addendum, here it is; it clarifies the paper and how to evaluate its "
            f"reproduction:\n<addendum>\n{addendum}\n</addendum>"
        ),
        _user(f"{intro}, concatenated:\n<files>\n{files}\n</files>"),
    ]
    if not code_only:
        script = reproduce_script if reproduce_script is not None else "(Does not exist)"
        messages.append(
            _user(f"Here is the submission's `reproduce.sh`, if any:\n<reproduce.sh>\n{script}\n</reproduce.sh>")
        )
        if category != "Code Development":
            log = reproduce_log if reproduce_log is not None else "(Does not exist)"
            messages.append(
                _user(f"`reproduce.log`, the output of running it:\n<reproduce.log>\n{log}\n</reproduce.log>")
            )
    context = "".join(f" -> {node.requirements}\n" for node in prior)
    messages.append(
        _user(
            "The rubric decomposes the paper hierarchically. For context, here are criteria that come before the "
            "one you grade (do NOT grade these):\n"
            f"<preceding_criteria>\n{context}</preceding_criteria>\n\n"
            f"Now, here is the criterion that you are grading:\n<criterion>\n{leaf.requirements}\n</criterion>\n\n"
            f"The criterion you are grading is of type {category} - {QUESTIONS[category]}"
        )
    )
    messages.append(_user(GRADING_FORMAT))
    return messages


def ranking_messages(leaf: TaskNode, *, paper: str, addendum: str, tree: str, max_files: int) -> list[dict[str, str]]:
    """Chat messages asking which files matter for ``leaf`` (paper, addenda, criterion, file tree)."""
    return [
        {"role": "system", "content": RANK_SYSTEM},
        _user(f"The paper is below:\n<paper>\n{paper}\n</paper>"),
        _user(f"The addendum to the paper, if any:\n<addendum>\n{addendum}\n</addendum>"),
        _user(f"Here is the criterion that you are grading:\n<criterion>\n{leaf.requirements}\n</criterion>"),
        _user(
            f"Here are the files in the submission attempt:\n\nDirectory structure:\n{tree}\n\n"
            f"Now return a list of the {max_files} most relevant files in order of relevance (descending) to the "
            "criterion. One full file path per line, nothing else."
        ),
    ]


def parse_messages(reply: str) -> list[dict[str, str]]:
    """The structured parse call's messages (send with ``response_format=RESPONSE_FORMAT``)."""
    return [{"role": "system", "content": PARSE_SYSTEM}, _user(reply)]


def repair_messages(messages: list[dict[str, str]], bad_reply: str) -> list[dict[str, str]]:
    """The conversation extended with a reply that had no score and a request to give one."""
    ask = "Your answer has no clear score. Answer again in the 3 parts; the # Score part must state 0 or 1."
    return [*messages, {"role": "assistant", "content": bad_reply}, _user(ask)]


class ReplyParseError(ValueError):
    """A judge reply without one clear 0/1 score."""


_SCORE_HEADING = re.compile(r"^\s*#+\s*\**\s*score\b.*$", re.IGNORECASE | re.MULTILINE)
_BINARY = re.compile(r"(?<![\w.])([01])(?:\.0+)?(?!\w|\.\d)")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_objects(text: str) -> list[object]:
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
    """(score, explanation) from a judge reply, strictly.

    The last "# Score" section must state exactly one of 0 and 1 (its own digits; "0 or 1" is ambiguous);
    the explanation is the reply without its Expectations part. A JSON object with a 0/1 "score" (and
    optional "explanation") is accepted too. Anything else raises :class:`ReplyParseError`.
    """
    headings = list(_SCORE_HEADING.finditer(text))
    if headings:
        section = text[headings[-1].end() :]
        values = {int(m) for m in _BINARY.findall(section)}
        if len(values) == 1:
            reality = text.find("# Reality")
            return values.pop(), text[reality if reality >= 0 else 0 :].strip()
        raise ReplyParseError(f"the # Score section states {sorted(values) or 'no'} 0/1 values: {section[:200]!r}")
    for obj in _json_objects(text):
        if isinstance(obj, dict):
            key = next((k for k in obj if str(k).lower() == "score"), None)
            if key is not None and (s := _as_binary(obj[key])) is not None:
                return s, str(obj.get("explanation", obj.get("Explanation", ""))).strip()
    raise ReplyParseError(f"no '# Score' section and no JSON score in reply: {text[:200]!r}")


def parse_structured(text: str) -> tuple[int, str]:
    """(score, explanation) from the parse call's JSON object; ReplyParseError if invalid or ``valid_score`` false."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        objs = [o for o in _json_objects(text) if isinstance(o, dict)]
        if not objs:
            raise ReplyParseError(f"parse call did not return JSON: {text[:200]!r}") from None
        obj = objs[0]
    if not isinstance(obj, dict) or obj.get("valid_score") is not True:
        raise ReplyParseError(f"parse call found no valid score: {text[:200]!r}")
    score = _as_binary(obj.get("score"))
    if score is None:
        raise ReplyParseError(f"parse call's score is not 0 or 1: {obj.get('score')!r}")
    return score, str(obj.get("explanation", "")).strip()


def parse_ranking(text: str, known: Sequence[str]) -> list[str]:
    """Paths of a ranking reply (one per line, or a JSON list) that are in ``known``, in order, no duplicates."""
    valid = set(known)
    lists = [o for o in _json_objects(text) if isinstance(o, list)]
    candidates = [str(p) for p in lists[0]] if lists else [line.strip(" -*`'\"\t") for line in text.splitlines()]
    out: list[str] = []
    for p in candidates:
        p = p.removeprefix("./").strip("/")
        if p in valid and p not in out:
            out.append(p)
    return out

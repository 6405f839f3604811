"""TEST DOUBLE of an OpenAI-compatible judge server (stands in for e.g. gpt-oss-120b served by SGLang).

A real HTTP server (the shared skeleton in openai_chat_double.py) speaking the real protocol:
``POST /v1/chat/completions`` -> ``{"choices": [{"message": {"role": "assistant", "content": ...}}]}``,
``GET /health``, ``GET /v1/models``; ``usage`` counts characters, not tokens. What it answers is
scripted by the test through a ``responder`` (request body -> :class:`Reply` or reply text); it can also
answer malformed text, HTTP errors, or drop the connection. It does not run any model: it exists only
for tests and benchmarks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

try:  # imported as a top-level module (tests put tests/integration on sys.path) or as a package module
    from openai_chat_double import Reply, ScriptedChatServer, texts
except ImportError:
    from tests.integration.openai_chat_double import Reply, ScriptedChatServer, texts

__all__ = ["OpenAIJudgeDouble", "Reply", "criterion_of", "grade_reply", "is_parse", "is_ranking", "keyword_responder"]

Responder = Callable[[dict[str, Any]], "Reply | str"]


def criterion_of(body: dict[str, Any]) -> str:
    """The criterion text of a grading or ranking request (between ``<criterion>`` tags)."""
    m = re.search(r"<criterion>\n(.*?)\n</criterion>", texts(body), re.DOTALL)
    return m.group(1) if m else ""


def is_ranking(body: dict[str, Any]) -> bool:
    return "most relevant files" in body["messages"][-1]["content"]


def is_parse(body: dict[str, Any]) -> bool:
    """The structured parse call (PaperBench's second call) asks for a json_schema response_format."""
    return (body.get("response_format") or {}).get("type") == "json_schema"


def tree_paths(body: dict[str, Any]) -> list[str]:
    """Full paths listed in a ranking request's directory tree (``├── name`` lines, 4 columns a level)."""
    text = body["messages"][-1]["content"]
    tree = text.split("Directory structure:\n", 1)[-1].split("\n\n", 1)[0]
    stack: list[str] = []
    lines = tree.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^((?:[│ ] {3})*)[├└]── (.*)$", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4
        stack[depth:] = [m.group(2)]
        nxt = re.match(r"^((?:[│ ] {3})*)[├└]── ", lines[i + 1]) if i + 1 < len(lines) else None
        if not nxt or len(nxt.group(1)) // 4 <= depth:
            out.append("/".join(stack))
    return out


def grade_reply(score: int, reason: str = "scripted by the test double") -> str:
    """A reply in the three-part format the grading prompt asks for."""
    return f"# Expectations\nThe criterion holds.\n\n# Reality\n{reason}.\n\n# Score\n{score}"


def keyword_responder(body: dict[str, Any]) -> Reply | str:
    """Default script: a criterion containing PASS scores 1, any other 0; ranking lists the *.py files."""
    if is_ranking(body):
        return "\n".join(p for p in tree_paths(body) if p.endswith(".py"))
    if is_parse(body):
        s = 1 if "# Score\n1" in body["messages"][-1]["content"] else 0
        return json.dumps({"valid_score": True, "score": s, "explanation": "parsed"})
    return grade_reply(1 if "PASS" in criterion_of(body) else 0)


class OpenAIJudgeDouble(ScriptedChatServer):
    """Test double server; ``with OpenAIJudgeDouble(responder) as srv: ... srv.url``."""

    model_id = "judge-double"

    def __init__(
        self, responder: Responder = keyword_responder, *, delay_s: float = 0.0, record: bool = True, port: int = 0
    ) -> None:
        super().__init__(port=port, record=record, delay_s=delay_s)
        self.responder = responder

    def answer(self, body: dict[str, Any], n: int) -> Reply:
        reply = self.responder(body)
        return Reply(reply) if isinstance(reply, str) else reply

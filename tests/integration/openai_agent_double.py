"""TEST DOUBLE of an OpenAI-compatible chat model with tools (stands in for an API model or a served policy).

A real HTTP server (the shared skeleton, openai_chat_double.py) speaking ``POST /v1/chat/completions`` with
``tools``: the reply is an assistant message whose ``tool_calls`` carry ``function.arguments`` as JSON text
(the OpenAI wire format). It runs no model: :class:`PaperScript` plays a scripted researcher who reads the
paper, tries to write into the read-only paper dir, makes one malformed tool call, writes code and
``reproduce.sh`` (or not), writes a FAKE ``reproduce.log`` claiming results, optionally tries to fetch a
blacklisted repository, and submits. Each conversation's plan is stated in its first assistant message and
read back from the history, so concurrent conversations stay independent. With ``reasoning`` every reply also
carries ``reasoning_content`` (as SGLang's reasoning parser returns it). ``fail_first`` answers the first N
requests with HTTP 503.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

try:  # imported as a top-level module (tests put tests/integration on sys.path) or as a package module
    from openai_chat_double import Reply, ScriptedChatServer
except ImportError:
    from tests.integration.openai_chat_double import Reply, ScriptedChatServer

FAKE_LOG = "FAKE CLAIM: every table of the paper reproduced exactly (accuracy 99.9%)"
REAL_MARK = "REAL-RUN-OK"

MAIN_PY = f"""import json, os
os.makedirs("results", exist_ok=True)
json.dump({{"metric": sum(range(10))}}, open("results/metrics.json", "w"))
print("{REAL_MARK}", sum(range(10)))
"""


def _call(name: str, args: dict[str, Any] | str, i: int) -> dict[str, Any]:
    text = args if isinstance(args, str) else json.dumps(args)
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": text}}


@dataclass
class PaperScript:
    """Which plan each task's conversations follow: ``plans[task_word] = [plan of conversation 0, 1, ...]``
    (matched against the prompt); plans: honest, cheat (+ blacklisted fetch), noscript (no reproduce.sh)."""

    plans: dict[str, list[str]] = field(default_factory=dict)
    blacklisted_url: str = "https://github.com/ajyl/dpo_toxic"
    reasoning: bool = False
    _started: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _new_plan(self, prompt: str) -> str:
        for word, plans in self.plans.items():
            if word in prompt:
                with self._lock:
                    n = self._started.get(word, 0)
                    self._started[word] = n + 1
                return plans[n % len(plans)]
        return "honest"

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        msgs = body["messages"]
        assistants = [m for m in msgs if m["role"] == "assistant"]
        if not assistants:
            plan = self._new_plan(msgs[1]["content"] if len(msgs) > 1 else "")
        else:
            plan = assistants[0]["content"].split("plan: ", 1)[1].split()[0]
        steps = [
            ("read_file_chunk", {"file": "/paper/paper.md", "max_lines": 30}),
            ("bash", {"command": "ls /paper; echo tamper > /paper/paper.md; echo write_rc=$?"}),
            ("write_file", '{"file": "submission/x.py", "content": '),  # malformed JSON arguments
            ("write_file", {"file": "submission/main.py", "content": MAIN_PY}),
        ]
        if plan != "noscript":
            steps.append(("write_file", {"file": "submission/reproduce.sh", "content": "set -e\npython3 main.py\n"}))
        steps.append(("write_file", {"file": "submission/reproduce.log", "content": FAKE_LOG}))
        steps.append(("write_file", {"file": "submission/README.md", "content": "Scripted reproduction.\n"}))
        if plan == "cheat":
            steps.append(("bash", {"command": f"git clone {self.blacklisted_url} /tmp/official"}))
        steps.append(("submit", {"summary": "done"}))
        i = min(len(assistants), len(steps) - 1)
        name, args = steps[i]
        content = f"plan: {plan} step {i}" if i == 0 else f"step {i}"
        msg = {"role": "assistant", "content": content, "tool_calls": [_call(name, args, i)]}
        if self.reasoning:
            msg["reasoning_content"] = f"Thinking ({plan}): next I call {name}."
        return msg


class OpenAIAgentDouble(ScriptedChatServer):
    """``with OpenAIAgentDouble(PaperScript(...)) as srv: srv.url``; ``requests`` keeps every body."""

    model_id = "agent-double"

    def __init__(
        self, script: PaperScript | None = None, *, fail_first: int = 0, status: int = 200, record: bool = True
    ) -> None:
        super().__init__(record=record)
        self.script = script or PaperScript()
        self.fail_first, self.status = fail_first, status

    def answer(self, body: dict[str, Any], n: int) -> Reply:
        if n <= self.fail_first:
            return Reply("overloaded (scripted)", status=503)
        if self.status != 200:
            return Reply("scripted error", status=self.status)
        if not body.get("tools"):
            return Reply("this double needs tools", status=400)
        usage = {"prompt_tokens": 0, "completion_tokens": 10, "total_tokens": 10}
        return Reply(message=self.script.reply(body), finish_reason="tool_calls", usage=usage)

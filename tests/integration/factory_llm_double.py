"""TEST DOUBLE: a scripted OpenAI-compatible endpoint answering Research-Factory's LLM steps (no model runs).

Speaks the real Chat Completions protocol (openai_chat_double.py). It recognises the step from the system prompt
that klong_megatron/factory/ sends ("Step 1 of 3" contributions, "Step 2 of 3" requirements, "Step 3 of 3" leaves,
"screen research papers" filter, "addendum") and answers valid JSON, except where the paper text carries a marker:

    ENDPOINT-DOWN  every request about this paper gets HTTP 500   (an endpoint that errors)
    NEVER-VALID    every leaves answer has an invalid task_category (a rubric that never validates)
    NEEDS-REPAIR   the first answer of each step lacks "weight"; the repair request gets a valid one
"""

from __future__ import annotations

import json
from typing import Any

try:  # imported as a top-level module (tests put tests/integration on sys.path) or as a package module
    from openai_chat_double import Reply, ScriptedChatServer
except ImportError:
    from tests.integration.openai_chat_double import Reply, ScriptedChatServer

FINE = ("Method Implementation", "Experimental Setup", "Evaluation, Metrics & Benchmarking")
CATS = ("Code Development", "Code Execution", "Result Analysis")


class FactoryLLMDouble(ScriptedChatServer):
    """``steps`` counts requests per step name; ``per_paper[title]`` counts Step-1 requests per paper title."""

    model_id = "factory-double"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.steps: dict[str, int] = {}
        self.per_paper: dict[str, int] = {}

    def answer(self, body: dict[str, Any], n: int) -> Reply:
        system = body["messages"][0]["content"]
        user = body["messages"][1]["content"]
        repair = len(body["messages"]) > 2
        step = next((s for s in ("Step 1", "Step 2", "Step 3", "screen", "addendum") if s in system), "?")
        with self._lock:
            self.steps[step] = self.steps.get(step, 0) + 1
            if step == "Step 1" and not repair:
                title = user.split("\n", 1)[0]
                self.per_paper[title] = self.per_paper.get(title, 0) + 1
        if "ENDPOINT-DOWN" in user:
            return Reply("backend unavailable", status=500)
        bad = "NEEDS-REPAIR" in user and not repair
        weight = {} if bad else {"weight": 1}
        if step == "Step 1":
            data = {"contributions": [{"requirements": f"Contribution {i} is reproduced.", **weight} for i in range(3)]}
        elif step == "Step 2":
            data = {"requirements": [{"requirements": f"Requirement {i} holds.", **weight} for i in range(2)]}
        elif step == "Step 3":
            cat = (lambda i: "Code Writing") if "NEVER-VALID" in user else (lambda i: CATS[i % 3])
            data = {"leaves": [{"requirements": f"Leaf {i} is implemented.", **weight, "task_category": cat(i),
                                "finegrained_task_category": FINE[i % 3]} for i in range(3)]}  # fmt: skip
        elif step == "screen":
            data = {"reproducible": True, "code_released": "github.com" in user, "reason": "small CPU experiments"}
        elif step == "addendum":
            data = {"addendum": "Use any public implementation of the baseline optimizer."}
        else:
            return Reply(f"unknown step in system prompt: {system[:80]}", status=400)
        return Reply("```json\n" + json.dumps(data) + "\n```")

"""TEST DOUBLE of an OpenAI-compatible chat model with tools (stands in for an API model or a served policy).

A real HTTP server (stdlib, threaded) speaking ``POST /v1/chat/completions`` with ``tools``: the reply is an
assistant message whose ``tool_calls`` carry ``function.arguments`` as JSON text (the OpenAI wire format).
It runs no model: :class:`PaperScript` plays a scripted researcher who reads the paper, tries to write into
the read-only paper dir, makes one malformed tool call, writes code and ``reproduce.sh`` (or not), writes a
FAKE ``reproduce.log`` claiming results, optionally tries to fetch a blacklisted repository, and submits.
Each conversation's plan is stated in its first assistant message and read back from the history, so
concurrent conversations stay independent. ``fail_first`` answers the first N requests with HTTP 503.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
        return {"role": "assistant", "content": content, "tool_calls": [_call(name, args, i)]}


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


class OpenAIAgentDouble:
    """``with OpenAIAgentDouble(PaperScript(...)) as srv: srv.url``; ``requests`` keeps every body."""

    def __init__(self, script: PaperScript | None = None, *, fail_first: int = 0, status: int = 200) -> None:
        self.script = script or PaperScript()
        self.fail_first, self.status = fail_first, status
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
        if n <= self.fail_first:
            return 503, {"error": {"message": "overloaded (scripted)"}}
        if self.status != 200:
            return self.status, {"error": {"message": "scripted error"}}
        if not body.get("tools"):
            return 400, {"error": {"message": "this double needs tools"}}
        msg = self.script.reply(body)
        usage = {"prompt_tokens": 0, "completion_tokens": 10, "total_tokens": 10}
        choice = {"index": 0, "message": msg, "finish_reason": "tool_calls"}
        return 200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "choices": [choice], "usage": usage}

    def start(self) -> OpenAIAgentDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                status, out = (404, {"error": "not found"})
                if self.path == "/v1/chat/completions":
                    status, out = double._answer(body)
                payload = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenAIAgentDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

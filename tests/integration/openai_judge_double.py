"""TEST DOUBLE of an OpenAI-compatible judge server (stands in for e.g. gpt-oss-120b served by SGLang).

A real HTTP server (stdlib, threaded, HTTP/1.1 keep-alive) speaking the real protocol:
``POST /v1/chat/completions`` -> ``{"choices": [{"message": {"role": "assistant", "content": ...}}]}``,
``GET /health``, ``GET /v1/models``; ``usage`` counts characters, not tokens. What it answers is
scripted by the test through a ``responder`` (request body -> :class:`Reply` or reply text); it can also
answer malformed text, HTTP errors, or drop the connection. It does not run any model: it exists only
for tests and benchmarks.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str = ""
    status: int = 200
    drop: bool = False
    """Close the connection without answering (a crashed server mid-request)."""
    delay_s: float = 0.0


Responder = Callable[[dict[str, Any]], "Reply | str"]


def _texts(body: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in body["messages"])


def criterion_of(body: dict[str, Any]) -> str:
    """The criterion text of a grading or ranking request (between ``<criterion>`` tags)."""
    m = re.search(r"<criterion>\n(.*?)\n</criterion>", _texts(body), re.DOTALL)
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


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 refuses bursts of concurrent clients
    daemon_threads = True


class OpenAIJudgeDouble:
    """Test double server; ``with OpenAIJudgeDouble(responder) as srv: ... srv.url``."""

    def __init__(
        self, responder: Responder = keyword_responder, *, delay_s: float = 0.0, record: bool = True, port: int = 0
    ):
        self.port = port
        self.responder = responder
        self.delay_s = delay_s
        self.record = record
        self.requests: list[dict[str, Any]] = []
        self.served = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OpenAIJudgeDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms ACK stalls
                with double._lock:
                    double._conns.add(self.connection)

            def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "judge-double"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                with double._lock:
                    double.served += 1
                    if double.record:
                        double.requests.append(body)
                reply = double.responder(body)
                reply = Reply(reply) if isinstance(reply, str) else reply
                if double.delay_s or reply.delay_s:
                    time.sleep(double.delay_s + reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.status != 200:
                    self._send(reply.status, json.dumps({"error": {"message": reply.content}}).encode())
                    return
                out = {
                    "id": f"chatcmpl-{double.served}",
                    "object": "chat.completion",
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.content},
                            "finish_reason": "stop",
                        }
                    ],
                    # not a tokenizer's count: characters, so that tests can check usage is summed
                    "usage": {
                        "prompt_tokens": len(_texts(body)),
                        "completion_tokens": len(reply.content),
                        "total_tokens": len(_texts(body)) + len(reply.content),
                    },  # fmt: skip
                }
                self._send(200, json.dumps(out).encode())

        self._server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (clients then get 'connection refused')."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for conn in self._conns:  # kept-alive connections die with the server
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()

    def __enter__(self) -> OpenAIJudgeDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

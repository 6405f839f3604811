"""TEST DOUBLE of an OpenAI-compatible judge server (stands in for e.g. gpt-oss-120b served by SGLang).

A real HTTP server (stdlib, threaded, HTTP/1.1 keep-alive) speaking the real protocol:
``POST /v1/chat/completions`` -> ``{"choices": [{"message": {"role": "assistant", "content": ...}}]}``,
``GET /health``, ``GET /v1/models``. What it answers is scripted by the test through a ``responder``
(request body -> :class:`Reply` or reply text); it can also answer malformed text, HTTP errors, or drop
the connection. It does not run any model: it exists only for tests and benchmarks.
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


def criterion_of(body: dict[str, Any]) -> str:
    """The criterion text of a grading or ranking request (the section after '# Criterion')."""
    text = body["messages"][1]["content"] if len(body["messages"]) > 1 else ""
    m = re.search(r"# Criterion(?: to grade)?\n\n(.*?)(?:\n\n|$)", text, re.DOTALL)
    return m.group(1) if m else ""


def is_ranking(body: dict[str, Any]) -> bool:
    return "Reply with a JSON list of paths" in body["messages"][-1]["content"]


def keyword_responder(body: dict[str, Any]) -> Reply | str:
    """Default script: a criterion containing PASS scores 1, any other 0; ranking lists *.py files."""
    if is_ranking(body):
        files = re.findall(r"^(\S+\.py) \(", body["messages"][-1]["content"], re.MULTILINE)
        return json.dumps(files)
    s = 1 if "PASS" in criterion_of(body) else 0
    return json.dumps({"explanation": f"scripted by the test double: {s}", "score": s})


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
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
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

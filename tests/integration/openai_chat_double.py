"""TEST DOUBLE skeleton: a scripted OpenAI-compatible chat server (no model runs in it).

A real HTTP server (stdlib, threaded, HTTP/1.1 keep-alive, TCP_NODELAY) speaking the real protocol:
``POST /v1/chat/completions`` -> ``{"id", "object": "chat.completion", "model", "choices": [{"index": 0,
"message": {...}, "finish_reason"}], "usage"}``, errors as ``{"error": {"message": ...}}`` with their HTTP status,
``GET /health``, ``GET /v1/models``. Subclasses script the answers by overriding :meth:`ScriptedChatServer.answer`
(request body -> :class:`Reply`): plain text, a full assistant message (``tool_calls``, ``reasoning_content``),
an HTTP error, a delay, or a dropped connection. Used by the judge double (openai_judge_double.py), the agent /
teacher double (openai_agent_double.py) and Research-Factory's tests and benchmarks.
"""

from __future__ import annotations

import json
import socket
import threading
import time
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
    message: dict[str, Any] | None = None
    """The whole assistant message (tool_calls, reasoning_content); None: ``{"role": "assistant", "content"}``."""
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None
    """None: characters (not a tokenizer's count), so that tests can check usage is summed."""


def texts(body: dict[str, Any]) -> str:
    """Every message content of a request, one per line."""
    return "\n".join(str(m.get("content", "")) for m in body["messages"])


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 refuses bursts of concurrent clients
    daemon_threads = True


class ScriptedChatServer:
    """``with Sub(...) as srv: srv.url``; ``requests`` keeps every body (``record``), ``served`` counts them."""

    model_id = "chat-double"

    def __init__(self, *, port: int = 0, record: bool = True, delay_s: float = 0.0) -> None:
        self.port, self.record, self.delay_s = port, record, delay_s
        self.requests: list[dict[str, Any]] = []
        self.served = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()

    def answer(self, body: dict[str, Any], n: int) -> Reply:
        """The reply to the ``n``-th request (1-based) with JSON ``body``; subclasses script it."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _completion(self, body: dict[str, Any], reply: Reply, n: int) -> dict[str, Any]:
        message = reply.message or {"role": "assistant", "content": reply.content}
        usage = reply.usage
        if usage is None:
            prompt, out = len(texts(body)), len(str(message.get("content") or ""))
            usage = {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        return {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body.get("model", ""),
                "choices": [choice], "usage": usage}  # fmt: skip

    def start(self) -> ScriptedChatServer:
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

            def _send(self, status: int, out: Any) -> None:
                payload = out if isinstance(out, bytes) else json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, b"")
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": double.model_id}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": "not found"})
                    return
                with double._lock:
                    double.served += 1
                    n = double.served
                    if double.record:
                        double.requests.append(body)
                reply = double.answer(body, n)
                if double.delay_s or reply.delay_s:
                    time.sleep(double.delay_s + reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    return
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": reply.content}})
                    return
                self._send(200, double._completion(body, reply, n))

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

    def __enter__(self):  # noqa: ANN204 (the subclass's type)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

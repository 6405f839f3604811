"""``klong-devserver``: a development HTTP server speaking a subset of SGLang's native API.

Dataflow: HTTP request (one thread per connection, HTTP/1.1 keep-alive) -> JSON validation ->
``DevModel`` (in-process PyTorch model, KV-cached sampling, one generation at a time) -> JSON reply
shaped like SGLang's. ``SGLangEngine`` passes the same contract tests against it as against SGLang.

Endpoints: POST /generate (``input_ids`` or ``text``, ``sampling_params``, ``return_logprob``,
``rid``), GET|POST /health_generate, GET /health, POST /flush_cache, POST /abort_request
(``rid`` or ``abort_all``), POST /update_weights_from_disk (``model_path``, ``weight_version``),
GET /get_model_info, GET /get_server_info, POST /v1/chat/completions (OpenAI format; needs a
tokenizer with a chat template), and the distributed weight sync: POST /init_weights_update_group
(join the trainer's group as rank ``rank_offset``; returns once the group is formed),
POST /update_weights_from_distributed (receive one broadcast from rank 0 per ``names`` entry, then
load them as HF parameters between generations), POST /destroy_weights_update_group; same bodies and
replies as SGLang (``rollout/weight_group.py``). ``backend=gloo`` on CPU; ``nccl`` needs the model on a GPU.

This is a development server for CPU runs and tests, not a replacement for SGLang: no batching,
no prefix cache, no parallelism; throughput is one sequence at a time.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from klong_megatron.rollout.devmodel import DevModel
from klong_megatron.rollout.engine import Generation, SamplingParams
from klong_megatron.rollout.weight_group import (
    BACKENDS,
    destroy_weight_group,
    init_weight_group,
    parse_dtype,
    receive_tensors,
)

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A client error; answered with HTTP 400 and this message."""


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"field {name!r}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


class DevServer:
    """Owns the model, the tokenizer (optional) and the HTTP server. ``port=0`` picks a free port.

    ``weight_sync_timeout_s`` bounds joining a weight-update group and each of its broadcasts.
    """

    def __init__(
        self,
        model: DevModel,
        *,
        tokenizer: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        model_path: str = "",
        weight_sync_timeout_s: float = 300.0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self._groups: dict[str, tuple[Any, str]] = {}  # group_name -> (process group, backend)
        self._groups_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.dev = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> DevServer:
        """Serve in a background thread (tests, embedded CPU runs)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="klong-devserver", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.model.abort()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ handlers: body -> (status, reply)
    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        if "input_ids" in body:
            ids = _field(body, "input_ids", list)
            if ids and isinstance(ids[0], list):
                raise BadRequest("field 'input_ids': batched requests are not supported by the dev server")
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise BadRequest("field 'input_ids': expected a non-empty list of token ids")
        elif "text" in body:
            ids = self._encode(_field(body, "text", str))
        else:
            raise BadRequest("missing field 'input_ids' (or 'text')")
        try:
            sampling = SamplingParams.from_sglang(_field(body, "sampling_params", dict, {}))
            rid = str(_field(body, "rid", str, "")) or uuid.uuid4().hex
            start = time.perf_counter()
            g = self.model.generate(ids, sampling, rid=rid)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        return self._generate_reply(g, rid, bool(body.get("return_logprob", False)), time.perf_counter() - start)

    def _generate_reply(self, g: Generation, rid: str, logprob: bool, latency: float) -> dict[str, Any]:
        last = g.output_ids[-1] if g.output_ids else None
        reason = {"stop": {"type": "stop", "matched": last}, "length": {"type": "length", "length": len(g.output_ids)}}
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": reason.get(g.finish_reason, {"type": "abort", "message": "aborted"}),
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": len(g.output_ids),
            "cached_tokens": 0,
            "weight_version": g.weight_version,
            "e2e_latency": latency,
        }
        if logprob:
            meta["output_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(g.output_logprobs, g.output_ids, strict=True)
            ]
        text = self.tokenizer.decode(g.output_ids) if self.tokenizer is not None else ""
        return {"text": text, "output_ids": g.output_ids, "meta_info": meta}

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this dev server has no tokenizer: send input_ids")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI ``/v1/chat/completions`` (non-streaming, n=1)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this dev server has no tokenizer with a chat template")
        messages = _field(body, "messages", list)
        if body.get("stream"):
            raise BadRequest("field 'stream': streaming is not supported by the dev server")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise BadRequest(f"field 'messages': chat template failed: {e}") from e
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
        params = {"max_new_tokens": max_tokens, "temperature": body.get("temperature", 1.0)}
        params |= {k: body[k] for k in ("top_p", "seed") if body.get(k) is not None}
        try:
            g = self.model.generate(self._encode(text), SamplingParams.from_sglang(params))
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e)) from e
        ids = g.output_ids[:-1] if g.finish_reason == "stop" else g.output_ids
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.tokenizer.decode(ids)},
                    "finish_reason": "length" if g.finish_reason == "length" else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": len(g.output_ids),
                "total_tokens": g.prompt_tokens + len(g.output_ids),
            },
        }

    def update_weights_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        path = _field(body, "model_path", str)
        version = str(body.get("weight_version") or path)
        try:
            self.model.load_weights(path, version)
        except Exception as e:  # a bad checkpoint must not kill the server; report it like SGLang
            return {"success": False, "message": f"failed to load {path}: {e}", "num_paused_requests": 0}
        self.model_path = path
        return {"success": True, "message": f"loaded {path} as weight_version {version}", "num_paused_requests": 0}

    # ------------------------------------------------------------------ distributed weight sync (SGLang's API)
    def init_weights_update_group(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        address, port = _field(body, "master_address", str), _field(body, "master_port", int)
        rank, world = _field(body, "rank_offset", int), _field(body, "world_size", int)
        name, backend = _field(body, "group_name", str, _GROUP), _field(body, "backend", str, "nccl")
        device = self._model_device()
        if backend not in BACKENDS:
            raise BadRequest(f"field 'backend': expected one of {BACKENDS}, got {backend!r}")
        if backend == "nccl" and not device.startswith("cuda"):
            return 400, _fail(f"backend 'nccl' needs GPUs: this dev server's model is on {device}; use backend='gloo'")
        with self._groups_lock:
            if name in self._groups:
                return 400, _fail(f"weight update group {name!r} already exists (destroy it first)")
            self._groups[name] = (None, backend)  # reserved while joining
        try:
            pg = init_weight_group(backend=backend, master_address=address, master_port=port, rank=rank,
                                   world_size=world, group_name=name, timeout_s=self.weight_sync_timeout_s)  # fmt: skip
        except Exception as e:  # the rendezvous failed or timed out: report it like SGLang
            self._groups.pop(name, None)
            return 400, _fail(f"failed to join weight update group {name!r} at {address}:{port} as rank {rank}: {e}")
        self._groups[name] = (pg, backend)
        return 200, {"success": True, "message": f"joined weight update group {name!r} as rank {rank} of {world}"}

    def update_weights_from_distributed(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        names, dtypes, shapes = (_field(body, k, list) for k in ("names", "dtypes", "shapes"))
        name = _field(body, "group_name", str, _GROUP)
        version = body.get("weight_version")
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest(f"fields 'names', 'dtypes', 'shapes' differ in length: {len(names)}, {len(dtypes)}, "
                             f"{len(shapes)}")  # fmt: skip
        try:
            types = [parse_dtype(d) for d in dtypes]
        except ValueError as e:
            raise BadRequest(f"field 'dtypes': {e}") from None
        if not all(isinstance(s, list) and all(isinstance(n, int) and n >= 0 for n in s) for s in shapes):
            raise BadRequest("field 'shapes': expected a list of lists of non-negative ints")
        pg, backend = self._groups.get(name, (None, ""))
        if pg is None:
            return 400, _fail(f"weight update group {name!r} is not initialised (call /init_weights_update_group)")
        try:
            tensors = receive_tensors(pg, types, shapes, device="cpu" if backend == "gloo" else self._model_device())
        except Exception as e:
            return 400, _fail(f"receiving {len(names)} tensors over {name!r} failed: {e}")
        try:
            self.model.load_tensors(dict(zip(names, tensors, strict=True)), None if version is None else str(version))
        except ValueError as e:
            return 400, _fail(f"received {len(names)} tensors but did not load them: {e}")
        return 200, {"success": True, "message": f"loaded {len(names)} tensors as weight_version "
                                                  f"{self.model.weight_version}"}  # fmt: skip

    def destroy_weights_update_group(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = _field(body, "group_name", str, _GROUP)
        with self._groups_lock:
            pg, _ = self._groups.get(name, (None, ""))
            if pg is None:
                return 400, _fail(f"weight update group {name!r} is not initialised")
            del self._groups[name]
        destroy_weight_group(pg)
        return 200, {"success": True, "message": f"destroyed weight update group {name!r}"}

    def _model_device(self) -> str:
        return str(getattr(self.model.lm, "device", "cpu"))

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": getattr(self.tokenizer, "name_or_path", None),
            "is_generation": True,
            "weight_version": self.model.weight_version,
        }

    def server_info(self) -> dict[str, Any]:
        return {
            "version": "klong-devserver",
            "tp_size": 1,
            "context_length": self.model.lm.max_context,
            "model_path": self.model_path,
            "tokens_generated": self.model.tokens_generated,
        }


_GROUP = "weight_update_group"  # SGLang's default group_name


def _fail(message: str) -> dict[str, Any]:
    return {"success": False, "message": message}


_WEIGHT_SYNC = {
    "/init_weights_update_group": DevServer.init_weights_update_group,
    "/update_weights_from_distributed": DevServer.update_weights_from_distributed,
    "/destroy_weights_update_group": DevServer.destroy_weights_update_group,
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive connections
    server_version = "klong-devserver"

    def setup(self) -> None:
        super().setup()
        # headers and body go out as two writes: without NODELAY, Nagle + delayed ACK add ~40 ms each
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def dev(self) -> DevServer:
        return self.server.dev  # type: ignore[attr-defined]

    def _reply(self, status: int, body: Any) -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRequest(f"request body is not JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(body, dict):
            raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._body() if method == "POST" else {}
            status, reply = self._route(method, path, body)
        except BadRequest as e:
            status, reply = 400, {"error": {"message": str(e), "type": "BadRequest", "path": path}}
        except Exception as e:  # a bug in one request must not take the server down
            log.exception("devserver %s %s failed", method, path)
            status, reply = 500, {"error": {"message": f"{type(e).__name__}: {e}", "path": path}}
        self._reply(status, reply)

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        dev = self.dev
        if path in ("/health", "/health_generate"):
            return 200, "ok"
        if path == "/get_model_info":
            return 200, dev.model_info()
        if path == "/get_server_info":
            return 200, dev.server_info()
        if method != "POST":
            return 404, {"error": {"message": f"no GET route {path}"}}
        if path == "/generate":
            return 200, dev.generate(body)
        if path == "/v1/chat/completions":
            return 200, dev.chat(body)
        if path == "/abort_request":
            dev.model.abort(None if body.get("abort_all") or not body.get("rid") else str(body["rid"]))
            return 200, {"success": True}
        if path == "/flush_cache":
            return 200, "Cache flushed (the dev server keeps no prefix cache)"
        if path == "/update_weights_from_disk":
            return 200, dev.update_weights_from_disk(body)
        if path in _WEIGHT_SYNC:
            return _WEIGHT_SYNC[path](dev, body)
        return 404, {"error": {"message": f"no route {path}"}}

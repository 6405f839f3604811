"""``klong-devserver``: a development HTTP server speaking a subset of SGLang's native API.

Dataflow: HTTP request (one thread per connection, HTTP/1.1 keep-alive) -> JSON validation ->
``DevModel`` (in-process PyTorch model, KV-cached sampling, one generation at a time) -> JSON reply
shaped like SGLang's. ``SGLangEngine`` passes the same contract tests against it as against SGLang.

It follows SGLang 0.5.23's source where a client could tell the difference (files under ``srt/``):
``entrypoints/http_server.py`` (routes, status codes), ``managers/io_struct.py`` (request fields),
``managers/scheduler_components/weight_updater.py`` (weight-update session, flush after a load),
``utils/weight_checker.py`` (checksums), ``layers/sampler.py`` (log-probs at the sampling temperature)
and ``sglang/api/v1/api_types.py`` (unknown ``sampling_params`` keys -> 400). Recorded replies written
from that source live in ``tests/integration/sglang_fixtures.py``; the contract tests run both.

Endpoints: POST /generate (``input_ids`` or ``text``, ``sampling_params``, ``return_logprob``, ``rid``,
``stream`` as SSE), GET|POST /health_generate, GET /health, GET|POST /flush_cache (400 while a request
holds a KV cache), POST /abort_request, POST /pause_generation (``mode`` abort | retract | in_place),
POST /continue_generation, POST /begin_weight_update, POST /end_weight_update,
POST /update_weights_from_disk (400 on failure), POST /init_weights_update_group,
POST /update_weights_from_distributed (only inside a begin/end session, like SGLang; unknown names are
skipped as SGLang's model loaders do, so a renamed parameter loads nothing: the trainer checks
/weights_checker), POST /destroy_weights_update_group, GET|POST /weights_checker (``action=checksum``),
GET /model_info, GET /server_info (and the deprecated /get_model_info, /get_server_info),
POST /v1/chat/completions and GET /v1/models (``rollout/devchat.py``).

This is a development server for CPU runs and tests, not a replacement for SGLang: no batching,
no prefix cache, no parallelism (``tp_size`` = ``pp_size`` = ``dp_size`` = 1); throughput is one
sequence at a time; ``sampling_params`` keys SGLang knows but the dev server does not implement
(``top_k``, penalties, grammars, ...) are refused with a 400 naming the key unless at their defaults.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from klong_megatron.rollout.devmodel import DevModel
from klong_megatron.rollout.engine import PAUSE_MODES, Generation, SamplingParams
from klong_megatron.rollout.weight_group import (
    BACKENDS,
    destroy_weight_group,
    engine_checksum,
    init_weight_group,
    overall_checksum,
    parse_dtype,
    receive_tensors,
    tensor_checksum,
)

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
"""The SGLang release whose API this server follows."""

# sglang/api/v1/api_types.py SamplingParams (0.5.23), in its order: unknown keys are a 400.
SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)  # fmt: skip
_IMPLEMENTED = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "skip_special_tokens",
                "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "sampling_seed"}  # fmt: skip
_DEFAULTS = {"top_k": 1073741824, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
             "repetition_penalty": 1.0, "min_new_tokens": 0, "n": 1, "ignore_eos": False, "logit_bias": {},
             "choice": []}  # fmt: skip
_FLUSH_REFUSED = ("Weights were updated, but the cache was not flushed because requests are still running or "
                  "queued. Retract or finish them, then call /flush_cache.")  # fmt: skip


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


def check_sampling_keys(params: dict[str, Any]) -> None:
    """SGLang's 400 for an unknown key (its serde text); a 400 for known keys this server does not implement."""
    for key, value in params.items():
        if key not in SAMPLING_KEYS:
            listed = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
            raise BadRequest(f"unknown field `{key}`, expected one of {listed}")
        if key not in _IMPLEMENTED and value is not None and value != _DEFAULTS.get(key):
            raise BadRequest(f"sampling_params.{key}={value!r} is not implemented by the dev server")


def stop_strings(params: dict[str, Any]) -> list[str]:
    stop = params.get("stop") or []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(x, str) and x for x in stops):
        raise BadRequest("sampling_params.stop: expected a non-empty string or a list of them")
    return stops


def cut_at_stop(g: Generation, stops: list[str], decode: Any) -> tuple[Generation, str | None]:
    """The generation cut after the first token whose text completes a stop string, and that string.

    Sampling is sequential, so the cut equals what a server stopping there would have produced."""
    if not stops or not g.output_ids:
        return g, None
    for n in range(1, len(g.output_ids) + 1):
        text = decode(g.output_ids[:n])
        hit = next((s for s in stops if s in text), None)
        if hit is not None:
            cut = Generation(g.output_ids[:n], g.output_logprobs[:n], "stop", prompt_tokens=g.prompt_tokens,
                             weight_version=g.weight_version)  # fmt: skip
            return cut, hit
    return g, None


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
        tool_format: str = "hermes",
    ) -> None:
        self.model = model
        self.tool_format = tool_format
        """Tool-call syntax /v1/chat/completions parses (SGLang's --tool-call-parser)."""
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self._groups: dict[str, tuple[Any, str]] = {}  # group_name -> (process group, backend)
        self._groups_lock = threading.Lock()
        self._session = False  # a begin_weight_update session is open
        self._queued = 0  # /generate requests received and not answered
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.dev = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self.started = time.time()

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
        self.model.resume()
        self.model.abort()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def _request(self, body: dict[str, Any]) -> tuple[list[int], SamplingParams, dict[str, Any]]:
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
        params = _field(body, "sampling_params", dict, {})
        check_sampling_keys(params)
        try:
            return ids, SamplingParams.from_sglang(params), params
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e)) from e

    def run_generation(self, ids: list[int], sampling: SamplingParams, rid: str, stops: list[str]) -> Any:
        """-> (Generation, matched stop string or None); counts the request as queued while it runs."""
        self._queued += 1
        try:
            g = self.model.generate(ids, sampling, rid=rid)
        except ValueError as e:
            raise BadRequest(str(e)) from e
        finally:
            self._queued -= 1
        return cut_at_stop(g, stops, self._decode)

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        ids, sampling, params = self._request(body)
        stops = stop_strings(params)
        rid = str(_field(body, "rid", str, "")) or uuid.uuid4().hex
        start = time.perf_counter()
        g, matched = self.run_generation(ids, sampling, rid, stops)
        return self._generate_reply(g, rid, bool(body.get("return_logprob", False)), time.perf_counter() - start,
                                    matched)  # fmt: skip

    def generate_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        """``stream: true``: SSE events ``data: {reply}`` then ``data: [DONE]`` (http_server.py stream_results).

        The dev server generates the whole answer, then sends it as one event (cumulative text and
        output ids, as SGLang's non-incremental streaming does in its last event)."""
        try:
            reply = self.generate(body)
        except BadRequest as e:  # after the headers: an error event, as SGLang's stream_results sends it
            reply = {"error": {"message": str(e), "type": "invalid_request_error", "code": 400, "retryable": False}}
        yield b"data: " + json.dumps(reply).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _generate_reply(self, g: Generation, rid: str, logprob: bool, latency: float,
                        matched: str | None = None) -> dict[str, Any]:  # fmt: skip
        last = g.output_ids[-1] if g.output_ids else None
        reason = {"stop": {"type": "stop", "matched": matched if matched is not None else last},
                  "length": {"type": "length", "length": len(g.output_ids)}}  # fmt: skip
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": reason.get(g.finish_reason, {"type": "abort", "message": "Abort before prefill"
                                                          if not g.output_ids else "Abort in waiting queue"}),
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": len(g.output_ids),
            "cached_tokens": 0,
            "weight_version": g.weight_version,
            "e2e_latency": latency,
        }  # fmt: skip
        if logprob:
            meta["output_token_logprobs"] = [
                [lp, t, None] for lp, t in zip(g.output_logprobs, g.output_ids, strict=True)
            ]
        return {"text": self._decode(g.output_ids), "output_ids": g.output_ids, "meta_info": meta}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise BadRequest("this dev server has no tokenizer: send input_ids")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ control
    def flush_cache(self) -> tuple[int, str]:
        """http_server.py ``/flush_cache``: 400 while requests are running or queued."""
        if self._running_or_queued():
            return 400, "Flush cache failed: requests are running or queued.\n"
        return 200, ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                     "waiting requests, the operation will not be performed.)\n")  # fmt: skip

    def _running_or_queued(self) -> bool:
        """Requests that keep SGLang from flushing: holding a KV cache, or waiting while not paused."""
        waiting = self._queued - self.model.running()
        return self.model.running() > 0 or (waiting > 0 and not self.model.paused)

    def pause(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        mode = _field(body, "mode", str, "abort")
        if mode not in PAUSE_MODES:
            raise BadRequest(f"field 'mode': expected one of {PAUSE_MODES}, got {mode!r}")
        self.model.pause(mode)
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def resume(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.model.resume()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def begin_weight_update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self._session:
            return 400, _fail("a weight-update session is already open; call end_weight_update() first")
        self._session = True
        return 200, {"success": True, "message": "Success"}

    def end_weight_update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not self._session:
            return 400, _fail("no weight-update session is open; call begin_weight_update() first")
        self._session = False
        return 200, {"success": True, "message": "Success"}

    def _after_load(self, body: dict[str, Any], message: str) -> tuple[int, dict[str, Any]]:
        if body.get("flush_cache", True) and self._running_or_queued():
            return 400, _fail(_FLUSH_REFUSED)
        return 200, {"success": True, "message": message}

    def update_weights_from_disk(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        path = _field(body, "model_path", str)
        version = body.get("weight_version")
        if body.get("abort_all_requests"):
            self.model.abort()
        try:
            self.model.load_weights(path, str(version) if version is not None else self.model.weight_version)
        except Exception as e:  # a bad checkpoint must not kill the server; report it like SGLang (400)
            return 400, _fail(f"Failed to update weights: {e}. Rolling back to the original weights.") | {
                "num_paused_requests": 0}  # fmt: skip
        self.model_path = path
        status, reply = self._after_load(body, "Succeeded to update model weights.")
        return status, reply | {"num_paused_requests": 0}

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
            return 400, _fail(f"Failed to initialize custom process group: {e}. ({name!r} at {address}:{port}, "
                              f"rank {rank})")  # fmt: skip
        self._groups[name] = (pg, backend)
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

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
        if not self._session:
            return 400, _fail("update_weights_from_distributed must run between begin_weight_update() and "
                              "end_weight_update()")  # fmt: skip
        pg, backend = self._groups.get(name, (None, ""))
        if pg is None:
            return 400, _fail(f"weight update group {name!r} is not initialised (call /init_weights_update_group)")
        if body.get("abort_all_requests"):
            self.model.abort()
        try:
            tensors = receive_tensors(pg, types, shapes, device="cpu" if backend == "gloo" else self._model_device())
        except Exception as e:
            return 400, _fail(f"Failed to receive weights: {e}")
        try:
            skipped = self.model.load_tensors(dict(zip(names, tensors, strict=True)),
                                              None if version is None else str(version), strict=False)  # fmt: skip
        except ValueError as e:
            return 400, _fail(f"Failed to update parameter online: {e}. The full weights of the ModelRunner are "
                              "partially updated. Please discard the whole weights.")  # fmt: skip
        if skipped:  # SGLang's loaders skip unknown names without a word; the dev server logs them
            log.warning("update_weights_from_distributed: %d unknown name(s) skipped, e.g. %s", len(skipped),
                        skipped[0])  # fmt: skip
        message = "Succeeded to update parameter online."
        return self._after_load(body, message + (f" Weight version updated to {version}." if version else ""))

    def destroy_weights_update_group(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = _field(body, "group_name", str, _GROUP)
        with self._groups_lock:
            pg, _ = self._groups.get(name, (None, ""))
            if pg is None:
                return 400, _fail(f"weight update group {name!r} is not initialised")
            del self._groups[name]
        destroy_weight_group(pg)
        return 200, {"success": True, "message": "Succeed to destroy custom process group."}

    def weights_checker(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``/weights_checker`` with ``action=checksum`` (SGLang's reply: ``ranks`` + ``per_engine_checksum``)."""
        action = _field(body, "action", str, "checksum")
        if action != "checksum":
            return 400, _fail(f"Unsupported action={action!r} (the dev server implements 'checksum')")
        skip = body.get("skip_tensor_list") or []
        with self.model._lock:
            sums = {n: tensor_checksum(t) for n, t in self.model.named_tensors().items()
                    if not any(p in n for p in skip) and "inv_freq" not in n}  # fmt: skip
        one = {"role": "target", "tp_rank": 0, "tp_size": 1, "dp_rank": 0, "dp_size": 1, "pp_rank": 0, "pp_size": 1,
               "rank": 0, "size": 1}  # fmt: skip
        rank = {"checksums": sums, "per_gpu_checksum": overall_checksum(sums), "parallelism_info": [one]}
        return 200, {"success": True, "message": "Success", "ranks": [rank],
                     "per_engine_checksum": engine_checksum([rank["per_gpu_checksum"]])}  # fmt: skip

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
            "version": SGLANG_VERSION,
            "frontend": "klong-devserver",
            "tp_size": 1,
            "pp_size": 1,
            "dp_size": 1,
            "ep_size": 1,
            "context_length": self.model.lm.max_context,
            "model_path": self.model_path,
            "startup_time": self.started,
            "internal_states": [{"tokens_generated": self.model.tokens_generated}],
            "tokens_generated": self.model.tokens_generated,
        }


_GROUP = "weight_update_group"  # SGLang's default group_name


def _fail(message: str) -> dict[str, Any]:
    return {"success": False, "message": message}


_CONTROL = {
    "/init_weights_update_group": DevServer.init_weights_update_group,
    "/update_weights_from_distributed": DevServer.update_weights_from_distributed,
    "/destroy_weights_update_group": DevServer.destroy_weights_update_group,
    "/update_weights_from_disk": DevServer.update_weights_from_disk,
    "/begin_weight_update": DevServer.begin_weight_update,
    "/end_weight_update": DevServer.end_weight_update,
    "/pause_generation": DevServer.pause,
    "/continue_generation": DevServer.resume,
}
_GET_OR_POST = {"/weights_checker": DevServer.weights_checker}


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

    def _stream(self, events: Iterator[bytes]) -> None:
        """Server-sent events, chunked (the connection stays usable afterwards)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in events:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

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
            if path == "/generate" and method == "POST" and body.get("stream"):
                self.dev._request(body)  # a bad request is a 400 before the stream starts
                return self._stream(self.dev.generate_stream(body))
            if path == "/v1/chat/completions" and method == "POST" and body.get("stream"):
                from klong_megatron.rollout.devchat import chat_stream

                return self._stream(chat_stream(self.dev, body))
            status, reply = self._route(method, path, body)
        except BadRequest as e:
            # /generate's contract gate answers {"error": "<text>"} (http_server.py generate_request)
            message = str(e)
            status, reply = 400, ({"error": message} if path == "/generate" else
                                  {"error": {"message": message, "type": "BadRequest", "path": path}})  # fmt: skip
        except Exception as e:  # a bug in one request must not take the server down
            log.exception("devserver %s %s failed", method, path)
            status, reply = 500, {"error": {"message": f"{type(e).__name__}: {e}", "path": path}}
        self._reply(status, reply)

    def _route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        dev = self.dev
        if path in ("/health", "/health_generate"):
            return 200, "ok"
        if path in ("/model_info", "/get_model_info"):
            return 200, dev.model_info()
        if path in ("/server_info", "/get_server_info"):
            return 200, dev.server_info()
        if path == "/v1/models":
            from klong_megatron.rollout.devchat import models

            return 200, models(dev)
        if path == "/flush_cache":
            return dev.flush_cache()
        if path in _GET_OR_POST:
            return _GET_OR_POST[path](dev, body)
        if method != "POST":
            return 405 if path in _CONTROL or path in ("/generate", "/v1/chat/completions") else 404, {
                "detail": "Method Not Allowed" if path in _CONTROL else "Not Found"}  # fmt: skip
        if path == "/generate":
            return 200, dev.generate(body)
        if path == "/v1/chat/completions":
            from klong_megatron.rollout.devchat import chat

            return 200, chat(dev, body)
        if path == "/abort_request":
            dev.model.abort(None if body.get("abort_all") or not body.get("rid") else str(body["rid"]))
            return 200, {"success": True}
        if path in _CONTROL:
            return _CONTROL[path](dev, body)
        return 404, {"detail": "Not Found"}

"""Recorded SGLang 0.5.23 request/response pairs, written from SGLang's source (not captured from a
running server: this machine has no GPU). Each entry cites the code that produces the reply; paths
are inside the ``sglang`` wheel (``pip download sglang==0.5.23 --no-deps``).

``state`` says what must hold on the server before the request (``idle``, ``session`` = a
begin_weight_update session open, ``running`` = a generation holds a KV cache). ``reply`` is the
exact JSON body, a string body, or None when only ``keys`` (the top-level keys) are fixed.
"""

from __future__ import annotations

SGLANG_VERSION = "0.5.23"

EXCHANGES = [
    {
        "name": "update outside a weight-update session",
        "source": "srt/managers/scheduler_components/weight_updater.py update_weights_from_distributed; "
        "srt/entrypoints/http_server.py update_weights_from_distributed (400 when not success)",
        "state": "idle",
        "method": "POST",
        "path": "/update_weights_from_distributed",
        "body": {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]]},
        "status": 400,
        "reply": {
            "success": False,
            "message": "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()",
        },
    },
    {
        "name": "begin a session",
        "source": "srt/managers/scheduler_components/weight_updater.py begin_weight_update",
        "state": "idle",
        "method": "POST",
        "path": "/begin_weight_update",
        "body": {},
        "status": 200,
        "reply": {"success": True, "message": "Success"},
    },
    {
        "name": "begin twice",
        "source": "srt/managers/scheduler_components/weight_updater.py begin_weight_update",
        "state": "session",
        "method": "POST",
        "path": "/begin_weight_update",
        "body": {},
        "status": 400,
        "reply": {
            "success": False,
            "message": "a weight-update session is already open; call end_weight_update() first",
        },  # fmt: skip
    },
    {
        "name": "end without a session",
        "source": "srt/managers/scheduler_components/weight_updater.py end_weight_update",
        "state": "idle",
        "method": "POST",
        "path": "/end_weight_update",
        "body": {},
        "status": 400,
        "reply": {"success": False, "message": "no weight-update session is open; call begin_weight_update() first"},
    },
    {
        "name": "pause",
        "source": "srt/entrypoints/http_server.py pause_generation",
        "state": "idle",
        "method": "POST",
        "path": "/pause_generation",
        "body": {"mode": "abort"},
        "status": 200,
        "reply": {"message": "Generation paused successfully.", "status": "ok"},
    },
    {
        "name": "continue",
        "source": "srt/entrypoints/http_server.py continue_generation",
        "state": "idle",
        "method": "POST",
        "path": "/continue_generation",
        "body": {},
        "status": 200,
        "reply": {"message": "Generation continued successfully.", "status": "ok"},
    },
    {
        "name": "flush while a request runs",
        "source": "srt/entrypoints/http_server.py flush_cache (400 when the scheduler refuses)",
        "state": "running",
        "method": "POST",
        "path": "/flush_cache",
        "body": None,
        "status": 400,
        "reply": None,
    },
    {
        "name": "flush when idle",
        "source": "srt/entrypoints/http_server.py flush_cache",
        "state": "idle",
        "method": "POST",
        "path": "/flush_cache",
        "body": None,
        "status": 200,
        "reply": "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
        "requests, the operation will not be performed.)\n",
    },
    {
        "name": "unknown sampling key",
        "source": "srt/entrypoints/api_contract.py generate_contract_error; sglang/api/v1/api_types.py "
        "_unknown_field (serde's text); http_server.py generate_request -> {'error': text}",
        "state": "idle",
        "method": "POST",
        "path": "/generate",
        "body": {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temprature": 0.5}},
        "status": 400,
        "reply": None,
        "keys": ["error"],
        "error_starts": "unknown field `temprature`, expected one of `max_new_tokens`, `stop`",
    },
    {
        "name": "weights checker checksum",
        "source": "srt/entrypoints/http_server.py check_weights; srt/managers/tokenizer_control_mixin.py "
        "check_weights; srt/utils/weight_checker.py _compute_checksum",
        "state": "idle",
        "method": "POST",
        "path": "/weights_checker",
        "body": {"action": "checksum"},
        "status": 200,
        "reply": None,
        "keys": ["success", "message", "ranks", "per_engine_checksum"],
        "rank_keys": ["checksums", "per_gpu_checksum", "parallelism_info"],
        "parallelism_keys": ["role", "tp_rank", "tp_size", "dp_rank", "dp_size", "pp_rank", "pp_size", "rank", "size"],
    },
    {
        "name": "server info",
        "source": "srt/entrypoints/http_server.py server_info (server args + internal_states + version)",
        "state": "idle",
        "method": "GET",
        "path": "/server_info",
        "body": None,
        "status": 200,
        "reply": None,
        "keys": ["tp_size", "pp_size", "dp_size", "internal_states", "version"],
    },
    {
        "name": "model info",
        "source": "srt/entrypoints/http_server.py model_info",
        "state": "idle",
        "method": "GET",
        "path": "/model_info",
        "body": None,
        "status": 200,
        "reply": None,
        "keys": ["model_path", "tokenizer_path", "is_generation", "weight_version"],
    },
]

TENSOR_CHECKSUMS = [
    # srt/managers/mm_utils.py tensor_hash on CPU: sha256 of the raw bytes, first 8 bytes big-endian, "%016x"
    # (srt/utils/weight_checker.py _hash_tensor). Values computed with hashlib from the bytes below.
    # overall_checksum({"w": c}) = sha256(b"w" + c.encode()).hexdigest()
    {
        "float32": [1.0, 2.0],
        "bytes_hex": "0000803f00000040",
        "checksum": "b9c80b5adeca4507",
        "overall_for_name_w": "761f4be09fbb855ef001514e29d195e08a6d54ed1dc9f035e26a51c72796c44e",
    },
]

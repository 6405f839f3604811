"""JSON-schema descriptions of the agent's tools, as the model sees them (OpenAI function format)."""

from __future__ import annotations

from typing import Any

MAX_CHUNK_LINES = 50
MAX_INLINE_CODE = 100_000

_TIMEOUT = {"type": "number", "description": "Seconds before the command is killed (capped by the task's limit)."}
_FILE = {"type": "string", "description": "Path; relative paths are taken from the work directory."}

SPECS: dict[str, dict[str, Any]] = {
    "bash": {
        "description": (
            "Run a bash command in the sandbox's work directory and return stdout, stderr and the exit code. "
            "There is no network. Processes still running when the command returns are killed, so run long jobs "
            "in the foreground with a larger timeout."
        ),
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The bash command."}, "timeout": _TIMEOUT},
            "required": ["command"],
        },
    },
    "python": {
        "description": "Run Python 3 code (as `python3 -c`) in the work directory; print what you want to see.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The program."}, "timeout": _TIMEOUT},
            "required": ["code"],
        },
    },
    "read_file_chunk": {
        "description": f"Show up to {MAX_CHUNK_LINES} numbered lines of a text file, starting at start_line.",
        "parameters": {
            "type": "object",
            "properties": {
                "file": _FILE,
                "start_line": {"type": "integer", "description": "First line to show (1-based). Default 1."},
                "max_lines": {"type": "integer", "description": f"How many lines (1-{MAX_CHUNK_LINES}). Default 50."},
            },
            "required": ["file"],
        },
    },
    "search_file": {
        "description": "Find the lines of a text file containing query (case-insensitive), with context lines.",
        "parameters": {
            "type": "object",
            "properties": {
                "file": _FILE,
                "query": {"type": "string", "description": "Text to look for."},
                "context_lines": {"type": "integer", "description": "Lines shown around each match (0-10). Default 2."},
            },
            "required": ["file", "query"],
        },
    },
    "write_file": {
        "description": "Create or overwrite a file with the given content (parent directories are created).",
        "parameters": {
            "type": "object",
            "properties": {"file": _FILE, "content": {"type": "string", "description": "The full new content."}},
            "required": ["file", "content"],
        },
    },
    "edit_file": {
        "description": "Replace the one occurrence of old_str in a file by new_str (old_str must occur exactly once).",
        "parameters": {
            "type": "object",
            "properties": {
                "file": _FILE,
                "old_str": {
                    "type": "string",
                    "description": "Exact text to replace, with enough context to be unique.",
                },
                "new_str": {"type": "string", "description": "Replacement text."},
            },
            "required": ["file", "old_str", "new_str"],
        },
    },
    "submit": {
        "description": "Finish the task: the work directory is graded as it is now. Refused if it is too early.",
        "parameters": {
            "type": "object",
            "properties": {"summary": {"type": "string", "description": "Optional note on what you did."}},
            "required": [],
        },
    },
}

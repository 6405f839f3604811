"""A submission directory as the judge sees it: file tree, content hash, text files, token budgets.

Dataflow: directory (e.g. a sandbox ``export``) -> :class:`Submission` (file list, sha256 over paths
and contents) -> graders read files through it; :class:`TokenCounter` cuts text to a token budget.

Limits: symlinks and files under ignored directories (VCS, caches, virtual environments) are not part
of the submission; binary files are listed in the tree but never read into a prompt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

IGNORED_DIRS = {".git", ".hg", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"}
REPRODUCE_SCRIPT = "reproduce.sh"
REPRODUCE_LOG = "reproduce.log"
REPRODUCE_CREATION_TIME = "reproduce.log.creation_time"
"""PaperBench's record of the run's start (``date +%s`` before it); read when there is no REPRODUCE_META."""
REPRODUCE_META = "reproduce.meta.json"
"""Written by the reproduction step (eval/reproduce.py) next to the real reproduce.log: exit_code, duration_s,
timed_out, missing_script, log_created_at (unix seconds; Result Analysis sees files modified after it)."""


class Submission:
    """Read-only view of a submission directory. File paths are POSIX paths relative to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"submission directory {str(root)!r} does not exist")

    @functools.cached_property
    def files(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
            for name in sorted(filenames):
                full = Path(dirpath, name)
                if full.is_file() and not full.is_symlink():
                    out.append(full.relative_to(self.root).as_posix())
        return out

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 over (path, size, bytes) of every file: equal hashes mean equal submissions."""
        h = hashlib.sha256()
        for rel in self.files:
            data = (self.root / rel).read_bytes()
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    def mtime(self, rel: str) -> float:
        """Modification time (unix epoch seconds) of a file of the submission."""
        return (self.root / rel).stat().st_mtime

    def log_created_at(self) -> float | None:
        """When the reproduction run that wrote ``reproduce.log`` started (unix epoch seconds), or None.

        From ``reproduce.meta.json`` (``log_created_at``), else PaperBench's ``reproduce.log.creation_time``,
        else the modification time of ``reproduce.log`` (PaperBench's own fallback, paperbench/judge/base.py);
        None without a log. A malformed meta or creation-time file is a ValueError naming the file.
        """
        meta, stamp, log = (self.root / n for n in (REPRODUCE_META, REPRODUCE_CREATION_TIME, REPRODUCE_LOG))
        if meta.is_file():
            try:
                value = json.loads(meta.read_text())["log_created_at"]
                return float(value)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{meta}: field 'log_created_at' must be a number ({type(e).__name__}: {e})") from None
        if stamp.is_file():
            try:
                return float(stamp.read_text().strip())
            except ValueError:
                raise ValueError(f"{stamp}: expected epoch seconds, got {stamp.read_text()[:40]!r}") from None
        return log.stat().st_mtime if log.is_file() else None

    def size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def is_text(self, rel: str) -> bool:
        with open(self.root / rel, "rb") as f:
            head = f.read(8192)
        if b"\0" in head:
            return False
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            return e.start > len(head) - 4  # a multi-byte character cut at the 8 KiB boundary
        return True

    def read(self, rel: str, max_bytes: int | None = None) -> str:
        with open(self.root / rel, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes)
        return data.decode("utf-8", errors="replace")

    def text_files(self) -> list[str]:
        return [f for f in self.files if self.is_text(f)]

    def tree(self) -> str:
        """One line per file: ``path (N bytes)``; binary files are marked."""
        return "\n".join(f"{f} ({self.size(f)} bytes{'' if self.is_text(f) else ', binary'})" for f in self.files)

    def reproduce(self) -> tuple[str | None, str | None]:
        """(reproduce.sh, reproduce.log) texts, each None when absent."""
        script, log = self.root / REPRODUCE_SCRIPT, self.root / REPRODUCE_LOG
        return (
            script.read_text(errors="replace") if script.is_file() else None,
            log.read_text(errors="replace") if log.is_file() else None,
        )


class TokenCounter:
    """Counts and cuts text in tokens of a Hugging Face tokenizer, or ~4 characters per token without one.

    ``tokenizer``: a ``tokenizer.json`` file, a directory holding one, or a Hugging Face Hub id whose
    tokenizer.json is already in the local Hugging Face cache (nothing is downloaded).
    """

    CHARS_PER_TOKEN = 4

    def __init__(self, tokenizer: str | Path | None = None) -> None:
        self._tok = None
        self.name = "chars/4"
        """Identifies the counting (part of grade cache keys)."""
        if tokenizer is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer)
            path = path / "tokenizer.json" if path.is_dir() else path
            if not path.is_file():
                path = _hub_cached(str(tokenizer)) or path
            if not path.is_file():
                raise FileNotFoundError(
                    f"judge tokenizer: no tokenizer.json at {str(path)!r} and {str(tokenizer)!r} is not a Hub id "
                    "in the local Hugging Face cache; set judge.tokenizer to the judge model's tokenizer"
                )
            self._tok = Tokenizer.from_file(str(path))
            self.name = f"{path.parent.name}/{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

    @property
    def approximate(self) -> bool:
        """True without a tokenizer (~4 characters a token)."""
        return self._tok is None

    def count(self, text: str) -> int:
        if self._tok is None:
            return -(-len(text) // self.CHARS_PER_TOKEN)
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens."""
        if max_tokens <= 0:
            return ""
        if self._tok is None:
            return text[: max_tokens * self.CHARS_PER_TOKEN]
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= max_tokens:
            return text
        return text[: enc.offsets[max_tokens - 1][1]]

    def tail(self, text: str, max_tokens: int) -> str:
        """The longest suffix of ``text`` with at most ``max_tokens`` tokens."""
        if max_tokens <= 0:
            return ""
        if self._tok is None:
            return text[-max_tokens * self.CHARS_PER_TOKEN :]
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= max_tokens:
            return text
        return text[enc.offsets[-max_tokens][0] :]


def _hub_cached(repo_id: str) -> Path | None:
    """``tokenizer.json`` of a Hub model id from the local Hugging Face cache, or None (never downloads)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "tokenizer.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None

"""Task blacklists (the paper's official code and the like) and the post-hoc log monitor.

A task's ``blacklist.txt`` lists URLs, one per line (``#`` comments, blank lines ignored; the single
word ``none`` means an empty list, as in PaperBench's task folders). A URL is
reduced to ``host/path`` (no scheme, ``www.``, ``.git`` or trailing ``/``; case-insensitive) and a
command matches when it mentions that resource as a whole path prefix, in any of the spellings a
fetch would use: ``https://github.com/o/r``, ``github.com/o/r.git``, ``git@github.com:o/r``,
``github.com/o/r/archive/main.zip`` and so on. The ToolSet refuses such bash/python calls before
they run; ``scan_messages`` re-checks a finished trajectory like PaperBench's monitor (tool calls and
tool outputs), so a fetch that slipped past the guard (e.g. a URL assembled at run time) is still
reported. Limits: a URL built from pieces at run time is invisible to the pre-run guard.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def normalize(url: str) -> str:
    """``https://www.GitHub.com/o/r.git/`` -> ``github.com/o/r``; ``git@host:o/r`` -> ``host/o/r``."""
    u = url.strip().lower()
    u = _SCHEME.sub("", u)
    u = re.sub(r"^[^/@\s]+@", "", u)  # user@ (ssh form)
    u = re.sub(r"^([^/:]+):(?!\d)", r"\1/", u)  # host:path (scp-like form), not host:port
    u = re.sub(r"^www\.", "", u)
    u = u.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return u[:-4] if u.endswith(".git") else u


@dataclass(frozen=True)
class Violation:
    """A blacklisted resource seen in a trajectory: where, which URL, and the surrounding text."""

    message_index: int
    role: str
    tool: str | None
    url: str
    excerpt: str


class Blacklist:
    """A set of normalised URLs; ``match(text)`` returns the first blacklisted one mentioned in text."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = sorted({n for n in (normalize(u) for u in urls) if n})
        self._patterns = [(u, self._pattern(u)) for u in self.urls]

    @staticmethod
    def _pattern(norm: str) -> re.Pattern[str]:
        host, _, path = norm.partition("/")
        host_re = r"(?:www\.)?" + re.escape(host)
        path_re = "/" + re.escape(path) if path else ""
        # host then path (via "/" or the scp-like ":"), ending at a path boundary: o/r must not match o/repo2.
        sep_path = path_re if not path else rf"[/:]{re.escape(path)}"
        return re.compile(rf"(?<![a-z0-9.-]){host_re}{sep_path}(?:\.git)?(?![a-z0-9_-])", re.I)

    @classmethod
    def from_file(cls, path: str | Path) -> Blacklist:
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read blacklist file {p}: {e}") from e
        urls = [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
        return cls([] if [u.lower() for u in urls] == ["none"] else urls)  # PaperBench: "none" = empty list

    def __bool__(self) -> bool:
        return bool(self.urls)

    def match(self, text: str) -> str | None:
        for url, pat in self._patterns:
            if pat.search(text):
                return url
        return None


def _excerpt(text: str, url: str, width: int = 120) -> str:
    i = text.lower().find(url.split("/", 1)[0])
    i = max(i, 0)
    return text[max(0, i - width // 2) : i + width // 2].replace("\n", " ")


def scan_messages(messages: list[dict[str, Any]], blacklist: Blacklist) -> list[Violation]:
    """Every mention of a blacklisted resource in assistant tool calls and tool outputs (OpenAI format)."""
    found = []
    for i, msg in enumerate(messages):
        role = msg.get("role", "")
        texts: list[tuple[str | None, str]] = []
        if role == "assistant":
            for call in msg.get("tool_calls") or []:
                fn = call.get("function", {})
                args = fn.get("arguments", "")
                texts.append((fn.get("name"), args if isinstance(args, str) else json.dumps(args)))
        elif role == "tool":
            content = msg.get("content", "")
            texts.append((msg.get("name"), content if isinstance(content, str) else json.dumps(content)))
        for tool, text in texts:
            if (url := blacklist.match(text)) is not None:
                found.append(Violation(i, role, tool, url, _excerpt(text, url)))
    return found

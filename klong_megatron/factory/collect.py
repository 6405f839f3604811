"""Stage 1, collect: paper sources -> ``papers/<id>/paper.md`` + ``meta.json``, deduplicated by content.

Sources: files under the configured local folders (``.pdf``, ``.tar.gz``/``.tgz``/``.gz`` arXiv source archives,
``.tex``, ``.md``) and, when the network allows, arXiv papers by id or by a search query (the ``arxiv`` package
lists them; their source archive, else their PDF, is downloaded into ``<output_dir>/downloads/``). An arXiv
lookup that fails (offline) is a recorded failure, not a crash: a run from a local folder needs no network.

Ids: the file name without its suffixes (``slug``), the arXiv short id for arXiv papers; two sources with the same
id get ``-<kind>`` appended. Dedupe: the SHA-256 of the Markdown with whitespace collapsed and case folded; of
equal papers the first in id order is kept, the others are marked ``duplicate_of`` it (and skipped later).
Metadata: ``title`` (arXiv, PDF metadata, ``\\title``, or the first heading), ``year`` (arXiv, PDF metadata, or
a new-style arXiv id), ``source``, ``kind``, ``converter``, ``sha256``, ``chars``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klong_megatron.errors import UserError
from klong_megatron.factory.convert import ConversionError, convert, kind_of, tex_title
from klong_megatron.factory.store import PaperDir, slug, write_json, write_text


@dataclass
class Source:
    """One paper to convert: a local file (``path``) plus what is known of it before conversion."""

    paper_id: str
    path: Path
    kind: str
    origin: str
    """``local:<file>`` or ``arxiv:<id>``."""
    meta: dict[str, Any] = field(default_factory=dict)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".gz", ".pdf", ".md", ".markdown", ".tex"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def local_sources(inputs: list[str]) -> list[Source]:
    """Paper files under each folder (recursive, sorted) or named directly; a missing input is an error."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and kind_of(f) and not f.name.startswith("."))
        elif p.is_file():
            if kind_of(p) is None:
                raise UserError(f"collect.inputs: {item}: not a paper file (.pdf, .tar.gz, .tgz, .gz, .tex, .md)")
            files.append(p)
        else:
            raise FileNotFoundError(2, "No such file or directory", item)
    return [Source(slug(_stem(f)), f, kind_of(f) or "", f"local:{f}") for f in files]


def unique_ids(sources: list[Source]) -> list[Source]:
    """Append ``-<kind>`` (then ``-<n>``) to ids that repeat, keeping the first as it is."""
    seen: set[str] = set()
    for s in sources:
        pid, n = s.paper_id, 1
        if pid in seen:
            pid = f"{s.paper_id}-{s.kind}"
        while pid in seen:
            n += 1
            pid = f"{s.paper_id}-{s.kind}-{n}"
        s.paper_id = pid
        seen.add(pid)
    return sources


def content_hash(markdown: str) -> str:
    """SHA-256 of the text with whitespace collapsed and case folded (formatting-only copies collide)."""
    return hashlib.sha256(" ".join(markdown.split()).casefold().encode()).hexdigest()


def _first_heading(md: str) -> str:
    for line in md.splitlines():
        if line.startswith("#") and (t := line.lstrip("#").replace("*", "").strip()):
            return t
    return ""


def _year_from_arxiv_id(paper_id: str) -> int | None:
    m = re.match(r"(\d{2})(\d{2})\.\d{4,5}", paper_id)
    return 2000 + int(m.group(1)) if m and 1 <= int(m.group(2)) <= 12 else None


def collect_one(src: Source, paper: PaperDir, *, pdf_layout: bool, pandoc: str, min_chars: int) -> dict[str, Any]:
    """Convert ``src`` into ``paper`` (paper.md, meta.json); returns the metadata. Raises ConversionError."""
    conv = convert(src.path, pdf_layout=pdf_layout, pandoc=pandoc)
    text = conv.markdown.strip()
    if len(text) < min_chars:
        raise ConversionError(f"{src.path}: only {len(text)} characters of text after conversion "
                              f"(collect.min_chars={min_chars}; a scanned PDF without a text layer?)")  # fmt: skip
    meta = {
        "id": src.paper_id,
        "title": src.meta.get("title") or conv.title or _first_heading(text) or tex_title(text) or src.paper_id,
        "year": src.meta.get("year") or conv.year or _year_from_arxiv_id(src.paper_id),
        "source": src.origin,
        "kind": src.kind,
        "converter": conv.converter,
        "sha256": content_hash(text),
        "chars": len(text),
        **({"warning": conv.warning} if conv.warning else {}),
        **{k: v for k, v in src.meta.items() if k not in ("title", "year")},
    }
    write_text(paper.path("paper.md"), text + "\n")
    if src.kind == "pdf":
        paper.path("paper.pdf").write_bytes(src.path.read_bytes())
    write_json(paper.path("meta.json"), meta)
    return meta


def mark_duplicates(papers: list[PaperDir]) -> dict[str, str]:
    """Mark every collected paper whose content hash an earlier one (id order) has; returns {dup: kept}."""
    first: dict[str, str] = {}
    dups: dict[str, str] = {}
    for p in sorted(papers, key=lambda p: p.paper_id):
        done = p.done("collect")
        if done is None:
            continue
        if done.get("duplicate_of"):
            dups[p.paper_id] = done["duplicate_of"]
            continue
        h = done["sha256"]
        if h in first:
            p.mark_done("collect", {**done, "duplicate_of": first[h]})
            dups[p.paper_id] = first[h]
        else:
            first[h] = p.paper_id
    return dups

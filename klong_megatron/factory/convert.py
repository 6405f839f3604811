"""Paper files -> Markdown text: PDF (pymupdf4llm), LaTeX source (pandoc) and Markdown.

Why these converters:

- PDF: ``pymupdf4llm`` (PyMuPDF; licence AGPL-3.0 or Artifex commercial): keeps headings, tables as Markdown
  tables, reading order, and runs on CPU without a model server. With ``layout=True`` it uses PyMuPDF's layout
  model (ONNX, CPU) for better reading order and tables, about 5x slower. It is the optional extra ``factory``
  (``pip install -e '.[factory]'``) because of its licence: the core package stays Apache-2.0 clean.
- LaTeX (arXiv source archives, ``.tar.gz`` or a gzipped single ``.tex``): ``pandoc`` (GPL-2.0+, run as a separate
  program, so its licence does not reach this code): sections become ``#`` headings, math stays ``$...$`` TeX,
  tables become pipe tables. Without pandoc: a clear one-line warning in the metadata and a small
  fallback (sections -> headings, comments dropped, the rest verbatim TeX, so equations and tables survive
  as TeX source).
- Markdown: read as UTF-8 as it is.

Archive extraction refuses absolute paths, ``..`` and links (a source archive is untrusted input).
Limits: scanned PDFs (no text layer) come out empty and are rejected by the caller; no OCR.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = {".pdf": "pdf", ".md": "markdown", ".markdown": "markdown", ".tex": "latex", ".gz": "latex", ".tgz": "latex"}
"""File suffix -> source kind (``.tar.gz`` / ``.tgz`` / ``.gz``: an arXiv source archive)."""


class ConversionError(ValueError):
    """A paper file that cannot be converted; the message names the file and why."""


@dataclass
class Converted:
    markdown: str
    converter: str
    """Which converter produced the text (``pymupdf4llm``, ``pandoc``, ``latex-fallback``, ``markdown``)."""
    title: str = ""
    year: int | None = None
    warning: str = ""


def kind_of(path: Path) -> str | None:
    """The source kind of a file name, or None for files that are not papers."""
    return KINDS.get(path.suffix.lower())


def convert(path: Path, *, pdf_layout: bool = False, pandoc: str = "pandoc", timeout_s: float = 300.0) -> Converted:
    """Convert one paper file; raises :class:`ConversionError` naming the file."""
    kind = kind_of(path)
    if kind == "pdf":
        return convert_pdf(path, layout=pdf_layout)
    if kind == "latex":
        return convert_latex(path, pandoc=pandoc, timeout_s=timeout_s)
    if kind == "markdown":
        try:
            return Converted(path.read_text(encoding="utf-8"), "markdown")
        except UnicodeDecodeError as e:
            raise ConversionError(f"{path}: not UTF-8 text (byte {e.start})") from None
    raise ConversionError(f"{path}: unknown paper file type (expected one of {sorted(KINDS)})")


def _pymupdf4llm(layout: bool) -> Any:
    """pymupdf4llm with its layout model on or off. Importing it loads the layout model (ONNX, ~3 s) whenever
    that is installed; without ``layout`` the import is kept from doing so (it then runs its classic path)."""
    if "pymupdf4llm" not in sys.modules and not layout:
        sys.modules.setdefault("pymupdf.layout", None)  # type: ignore[arg-type]  # -> ImportError inside
    elif layout and sys.modules.get("pymupdf.layout", 0) is None:
        del sys.modules["pymupdf.layout"]
    import pymupdf
    import pymupdf4llm

    pymupdf.no_recommend_layout()  # we chose; no advice on stdout
    pymupdf4llm.use_layout(layout)
    return pymupdf4llm


def convert_pdf(path: Path, *, layout: bool = False) -> Converted:
    """PDF -> Markdown with pymupdf4llm; title and year from the PDF's metadata when present."""
    try:
        import pymupdf

        pymupdf4llm = _pymupdf4llm(layout)
    except ImportError as e:
        raise ConversionError(
            f"{path}: PDF conversion needs pymupdf4llm (AGPL-3.0): pip install -e '.[factory]' ({e})"
        ) from None
    try:
        with pymupdf.open(path) as doc:
            if doc.page_count == 0:
                raise ConversionError(f"{path}: the PDF has no readable pages (corrupt or truncated file)")
            md = pymupdf4llm.to_markdown(doc, show_progress=False)
            meta = doc.metadata or {}
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - PyMuPDF raises its own types for broken files
        raise ConversionError(f"{path}: cannot read the PDF: {type(e).__name__}: {e}") from None
    year = re.match(r"D:(\d{4})", meta.get("creationDate") or "")
    return Converted(md, "pymupdf4llm" + ("+layout" if layout else ""), (meta.get("title") or "").strip(),
                     int(year.group(1)) if year else None)  # fmt: skip


def _safe_extract(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                    raise ConversionError(f"{archive}: unsafe archive member {m.name!r}")
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConversionError(f"{archive}: cannot read the source archive: {e}") from None


def _main_tex(root: Path, archive: Path) -> Path:
    texs = sorted(root.rglob("*.tex"))
    mains = [p for p in texs if "\\documentclass" in p.read_text(errors="replace")]
    if not mains:
        raise ConversionError(f"{archive}: no .tex file with \\documentclass in the archive")
    named = [p for p in mains if p.stem.lower() in ("main", "paper", "ms")]
    return (named or sorted(mains, key=lambda p: -p.stat().st_size))[0]


def convert_latex(path: Path, *, pandoc: str = "pandoc", timeout_s: float = 300.0) -> Converted:
    """A ``.tex`` file or an arXiv source archive -> Markdown (pandoc, else the fallback with a warning)."""
    with tempfile.TemporaryDirectory(prefix="klong-tex-") as tmp:
        root = Path(tmp)
        if path.suffix.lower() == ".tex":
            main = path
        elif tarfile.is_tarfile(path):
            _safe_extract(path, root)
            main = _main_tex(root, path)
        else:  # arXiv serves a single-file source as plain gzip
            try:
                (root / "main.tex").write_bytes(gzip.decompress(path.read_bytes()))
            except (OSError, EOFError) as e:
                raise ConversionError(f"{path}: neither a tar archive nor gzip-compressed TeX: {e}") from None
            main = root / "main.tex"
        tex = main.read_text(errors="replace")
        title = tex_title(tex)
        exe = shutil.which(pandoc)
        if exe is None:
            warn = f"pandoc not found ({pandoc!r}): LaTeX kept as TeX with headings; install pandoc for Markdown"
            return Converted(latex_fallback(tex), "latex-fallback", title, warning=warn)
        # pipe tables only (an LLM reads them best); math stays $...$ TeX
        to = "markdown-simple_tables-multiline_tables-grid_tables"
        cmd = [exe, "-f", "latex", "-t", to, "--wrap=none", main.name]
        r = subprocess.run(cmd, cwd=main.parent, capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0:
            raise ConversionError(f"{path}: pandoc failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
        return Converted(r.stdout, "pandoc", title)


def tex_title(tex: str) -> str:
    """The text of the first ``\\title{...}`` (commands and braces dropped), or ""."""
    m = re.search(r"\\title\s*(?:\[[^\]]*\])?\{((?:[^{}]|\{[^{}]*\})*)\}", tex)
    return re.sub(r"\s+", " ", re.sub(r"\\\\|\\[a-zA-Z]+\*?|[{}]", " ", m.group(1))).strip() if m else ""


_SECTION = re.compile(r"\\(section|subsection|subsubsection)\*?\{([^}]*)\}")


def latex_fallback(tex: str) -> str:
    """Without pandoc: drop comments, turn sectioning commands into Markdown headings, keep the rest as TeX."""
    body = re.sub(r"(?<!\\)%.*", "", tex)
    level = {"section": "##", "subsection": "###", "subsubsection": "####"}
    return _SECTION.sub(lambda m: f"\n{level[m.group(1)]} {m.group(2).strip()}\n", body)

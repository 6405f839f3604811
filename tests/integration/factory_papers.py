"""Paper files made at test time for Research-Factory's tests and benchmark: PDFs (reportlab), arXiv-style
LaTeX source archives (tar.gz) and a corrupt PDF. Each paper has sections, an equation, a table and a
"code is available at" sentence, so conversion, filtering and blacklisting have something real to find."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

WORDS = ("We study sparse widget networks trained with stochastic gradient descent on small tabular benchmarks. "
         "The method prunes widgets whose gradient norm stays below a threshold for several epochs. ")  # fmt: skip


def body(title: str, marker: str = "", repeats: int = 6) -> list[tuple[str, str]]:
    """(heading, paragraph) pairs of a small paper; ``marker`` goes into the abstract (double's scripting)."""
    slugged = "-".join(title.lower().split()[:2])
    return [
        ("Abstract", f"{marker} {WORDS} Our code is available at https://github.com/acme/{slugged}."),
        ("1 Introduction", WORDS * repeats + "We build on https://github.com/pytorch/pytorch for autograd."),
        ("2 Method", WORDS * repeats + "The loss is L = sum_i (y_i - f(x_i))^2 + lambda ||w||_1."),
        ("3 Experiments", WORDS * repeats + "Table 1 reports accuracy: widgets 0.91, dense 0.89."),
        ("4 Conclusion", WORDS * 2),
    ]


def make_pdf(path: Path, title: str, marker: str = "", repeats: int = 6) -> Path:
    """A text PDF with a title (also in the PDF metadata), headings, paragraphs and a table."""
    from reportlab.lib.pagesizes import letter
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Table, TableStyle

    styles = getSampleStyleSheet()
    doc = SimpleDocTemplate(str(path), pagesize=letter, title=title)
    flow = [Paragraph(title, styles["Title"])]
    for head, text in body(title, marker, repeats):
        flow += [Paragraph(head, styles["Heading1"]), Paragraph(text, styles["Normal"])]
    table = Table([["Model", "Accuracy"], ["widgets", "0.91"], ["dense", "0.89"]])
    table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.5, (0, 0, 0))]))  # ruled: found as a table
    flow.append(table)
    doc.build(flow)
    return path


def make_latex_archive(path: Path, title: str, marker: str = "", repeats: int = 6) -> Path:
    """An arXiv-style source archive: main.tex (\\documentclass, sections, an equation, a tabular) + a section
    file pulled in with \\input."""
    secs = body(title, marker, repeats)
    main = [r"\documentclass{article}", rf"\title{{{title}}}", r"\begin{document}", r"\maketitle"]
    main += [rf"\section{{{h.split(' ', 1)[-1]}}}" + "\n" + t for h, t in secs[:3]]
    main += [r"\begin{equation} L(w) = \sum_i (y_i - f_w(x_i))^2 + \lambda \|w\|_1 \end{equation}",
             r"\begin{tabular}{lc} Model & Accuracy \\ widgets & 0.91 \\ dense & 0.89 \end{tabular}",
             r"\input{sections/rest}", r"\end{document}"]  # fmt: skip
    rest = "\n".join(rf"\section{{{h.split(' ', 1)[-1]}}}" + "\n" + t for h, t in secs[3:])
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("main.tex", "\n".join(main)), ("sections/rest.tex", rest)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_markdown(path: Path, title: str, marker: str = "") -> Path:
    """The same paper as Markdown (a title heading, ``##`` sections)."""
    path.write_text(f"# {title}\n\n" + "\n\n".join(f"## {h}\n\n{t}" for h, t in body(title, marker)) + "\n")
    return path


def make_corrupt_pdf(path: Path) -> Path:
    path.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage, truncated")
    return path

"""Research-Factory's parts on real inputs: conversion (pymupdf4llm on reportlab PDFs, pandoc on an arXiv-style
archive), blacklists of the REAL PaperBench papers (../shared/data/paperbench_tasks, compared with their
real blacklist.txt), filter rules, dedupe, the rubric-step checker and the config surface."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from klong_megatron.config.factory import FactoryConfig, FilterConfig, RubricGenConfig
from klong_megatron.factory.blacklist import official_urls
from klong_megatron.factory.collect import content_hash, local_sources, unique_ids
from klong_megatron.factory.convert import ConversionError, convert, latex_fallback
from klong_megatron.factory.filter import rule_checks
from klong_megatron.factory.rubric import _items
from klong_megatron.factory.stats import load_dir, rubric_stats
from klong_megatron.tasks.paperbench import parse_blacklist

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from factory_papers import make_corrupt_pdf, make_latex_archive, make_pdf  # noqa: E402

REAL = ("mechanistic-understanding", "semantic-self-consistency", "stochastic-interpolants")


def test_pdf_keeps_sections_table_title_and_url(tmp_path: Path) -> None:
    c = convert(make_pdf(tmp_path / "p.pdf", "Sparse Widgets for Tabular Learning"))
    assert c.converter == "pymupdf4llm" and c.title == "Sparse Widgets for Tabular Learning"
    assert "# **2 Method**" in c.markdown and "|widgets|0.91|" in c.markdown.replace(" ", "")
    assert "https://github.com/acme/sparse-widgets" in c.markdown


def test_corrupt_pdf_is_a_conversion_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"broken\.pdf: .*corrupt"):
        convert(make_corrupt_pdf(tmp_path / "broken.pdf"))


@pytest.mark.skipif(shutil.which("pandoc") is None, reason="pandoc not installed (tools/services.sh installs it)")
def test_latex_archive_through_pandoc_keeps_equation_table_and_input(tmp_path: Path) -> None:
    c = convert(make_latex_archive(tmp_path / "x.tar.gz", "Dense Gadgets"))
    assert c.converter == "pandoc" and c.title == "Dense Gadgets"
    assert r"$$L(w) = \sum_i (y_i - f_w(x_i))^2 + \lambda \|w\|_1$$" in c.markdown
    assert "| widgets | 0.91" in c.markdown or "|widgets|0.91|" in c.markdown.replace(" ", "")
    assert "# Conclusion" in c.markdown  # from sections/rest.tex, pulled in by \input


def test_without_pandoc_latex_falls_back_with_a_warning(tmp_path: Path) -> None:
    c = convert(make_latex_archive(tmp_path / "x.tar.gz", "Dense Gadgets"), pandoc="no-such-pandoc")
    assert c.converter == "latex-fallback" and "pandoc not found" in c.warning
    assert "## Method" in c.markdown and r"\sum_i" in c.markdown
    assert latex_fallback("a % comment\n\\subsection*{B}") == "a \n\n### B\n"


def test_archive_with_parent_path_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.tex")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"x\n\n"))
    with pytest.raises(ConversionError, match="unsafe archive member '../escape.tex'"):
        convert(path)


@pytest.mark.parametrize("task", REAL)
def test_blacklist_of_real_paper_matches_paperbench(task: str) -> None:
    own, others = official_urls((SHARED / "paperbench_tasks" / task / "paper.md").read_text(), ["github.com"])
    real = parse_blacklist((SHARED / "paperbench_tasks" / task / "blacklist.txt").read_text(), task)
    assert own == real
    assert others  # each paper also cites third-party code, which must not be blacklisted


def test_filter_rules_give_reasons() -> None:
    md = "# Intro\n" + "x " * 3000 + "\n## Method\n\\section*{Results}\n"
    checks = rule_checks(md, {"title": "A survey of widgets", "year": 2019}, FilterConfig(min_chars=100, min_year=2020))
    failed = [why for ok, why in checks if not ok]
    assert failed == ["year 2019 (need >= 2020)", "exclude word 'survey' in the title/abstract"]
    assert any("3 section headings" in why for ok, why in checks if ok)


def test_dedupe_hash_ignores_whitespace_and_case_and_ids_stay_unique(tmp_path: Path) -> None:
    assert content_hash("A  Paper\n\nText") == content_hash("a paper text")
    assert content_hash("a paper text") != content_hash("a paper texts")
    for name in ("x.pdf", "x.tar.gz", "x.md"):
        (tmp_path / name).write_text("x")
    ids = [s.paper_id for s in unique_ids(local_sources([str(tmp_path)]))]
    assert ids == ["x", "x-pdf", "x-latex"]  # sorted: x.md, x.pdf, x.tar.gz
    with pytest.raises(FileNotFoundError):
        local_sources([str(tmp_path / "missing")])


def test_rubric_step_checker_names_the_bad_field() -> None:
    check = _items("leaves", 1, 2, leaf=True)
    ok = {"requirements": "r", "weight": 1, "task_category": "Code Execution",
          "finegrained_task_category": "Experimental Setup"}  # fmt: skip
    assert check({"leaves": [ok]})[0]["task_category"] == "Code Execution"
    with pytest.raises(ValueError, match=r"answer.leaves\[0\].task_category must be one of"):
        check({"leaves": [{**ok, "task_category": "Coding"}]})
    with pytest.raises(ValueError, match="must have 1 to 2 items, got 3"):
        check({"leaves": [ok] * 3})
    with pytest.raises(ValueError, match=r"answer.leaves\[0\].weight must be"):
        check({"leaves": [{**ok, "weight": "heavy"}]})


def test_stats_of_real_rubrics() -> None:
    trees = load_dir(SHARED / "paperbench_rubrics")
    stats = [rubric_stats(t) for t in trees]
    assert [s["leaves"] for s in stats] == [96, 77, 69]  # mechanistic, semantic, stochastic (sorted file names)
    assert all(abs(sum(v for k, v in s.items() if k.startswith("share")) - 1) < 1e-9 for s in stats)


@pytest.mark.usefixtures("hydra_configs")
def test_factory_config_composes_and_bad_values_name_the_field() -> None:
    cfg = OmegaConf.to_object(compose(config_name="factory", overrides=["stages=[collect,tasks]"]))
    assert isinstance(cfg, FactoryConfig) and cfg.stages == ["collect", "tasks"]
    with pytest.raises(Exception, match="stages must be"):
        OmegaConf.to_object(compose(config_name="factory", overrides=["stages=[collect,publish]"]))
    with pytest.raises(ValueError, match=r"rubric.leaves must be \[min, max\]"):
        RubricGenConfig(leaves=[3, 1])


def test_search_api_urls_join_the_blacklist() -> None:
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from klong_megatron.config.factory import BlacklistConfig
    from klong_megatron.factory.blacklist import blacklist_paper

    class Search(BaseHTTPRequestHandler):  # a search API: GET ?q=<title> -> {"urls": [...]}
        def do_GET(self) -> None:
            payload = json.dumps({"urls": ["https://gitlab.com/acme/widgets-mirror", self.path]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), Search)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = BlacklistConfig(search_url=f"http://127.0.0.1:{srv.server_address[1]}/search")
        md = "Our code is available at https://github.com/acme/widgets. We use github.com/other/lib."
        found = asyncio.run(blacklist_paper(md, "Sparse Widgets", cfg, None))
    finally:
        srv.shutdown()
    assert found["urls"] == ["https://github.com/acme/widgets", "https://gitlab.com/acme/widgets-mirror",
                             "/search?q=Sparse+Widgets"]  # fmt: skip
    assert [c["url"] for c in found["candidates"]] == ["https://github.com/other/lib"]


ATOM = """<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:opensearch="http://a9.com/-/spec/opensearch/1.1/"
      xmlns:arxiv="http://arxiv.org/schemas/atom">
  <opensearch:totalResults>1</opensearch:totalResults><opensearch:startIndex>0</opensearch:startIndex>
  <opensearch:itemsPerPage>1</opensearch:itemsPerPage>
  <entry>
    <id>http://arxiv.org/abs/2401.00001v1</id><updated>2024-01-02T00:00:00Z</updated>
    <published>2023-12-29T18:00:00Z</published><title>Dense  Gadgets
      via LaTeX</title><summary>We study gadgets.</summary><author><name>A. Author</name></author>
    <link href="{base}/abs/2401.00001v1" rel="alternate" type="text/html"/>
    <link title="pdf" href="{base}/pdf/2401.00001v1" rel="related" type="application/pdf"/>
    <arxiv:primary_category term="cs.LG"/><category term="cs.LG"/>
  </entry>
</feed>"""


def test_arxiv_id_through_the_arxiv_package_and_source_download(tmp_path: Path) -> None:
    """The real ``arxiv`` package parses an Atom feed in arXiv's API format (info.arxiv.org/help/api/user-manual)
    served locally; the source archive is fetched from the /src/ URL it derives, then converted."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from klong_megatron.factory.arxiv_source import arxiv_sources

    archive = make_latex_archive(tmp_path / "src.tar.gz", "Dense Gadgets via LaTeX").read_bytes()
    seen: list[str] = []

    class ArxivMirror(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            payload = ATOM.format(base=base).encode() if self.path.startswith("/api/query") else archive
            self.send_response(200 if self.path.startswith(("/api/query", "/src/2401.00001v1")) else 404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), ArxivMirror)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{srv.server_address[1]}/api/query"
        sources, failures = arxiv_sources(["2401.00001"], None, 5, tmp_path / "dl", api_url=api)
    finally:
        srv.shutdown()
    assert failures == [] and "id_list=2401.00001" in seen[0] and seen[1] == "/src/2401.00001v1"
    (src,) = sources
    assert (src.paper_id, src.kind, src.origin) == ("2401.00001v1", "latex", "arxiv:2401.00001v1")
    assert src.meta["title"] == "Dense Gadgets via LaTeX" and src.meta["year"] == 2023
    assert "Method" in convert(src.path).markdown  # pandoc, or the fallback without it


def test_without_pymupdf4llm_a_pdf_fails_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymupdf4llm", None)  # as if the 'factory' extra were not installed
    with pytest.raises(ConversionError, match=r"p\.pdf: PDF conversion needs pymupdf4llm .*\.\[factory\]"):
        convert(make_pdf(tmp_path / "p.pdf", "A Paper"))

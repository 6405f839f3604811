"""arXiv papers by id or search query -> local files for the collect stage (needs the network).

The ``arxiv`` package (MIT) lists papers through arXiv's Atom API; the source archive (``/src/<id>``, LaTeX:
keeps equations and tables exactly) is downloaded with httpx, else the PDF. Files go to ``download_dir`` and
are reused when already there, so a resumed run downloads nothing twice. Every failure (no network, an unknown
id, a refused download) comes back as ``(arxiv:<id or query>, reason)`` for the run's failure list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from klong_megatron.factory.collect import Source
from klong_megatron.factory.store import slug


def _download(client: httpx.Client, url: str, dest: Path) -> Path:
    if dest.is_file() and dest.stat().st_size:
        return dest
    r = client.get(url, follow_redirects=True)
    r.raise_for_status()
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(r.content)
    tmp.replace(dest)
    return dest


def _source_of(result: Any, client: httpx.Client, download_dir: Path) -> Source:
    short = result.get_short_id()
    pid = slug(short.replace("/", "_"))
    meta = {"title": " ".join(result.title.split()), "year": result.published.year,
            "arxiv_id": short, "url": result.entry_id}  # fmt: skip
    try:
        path = _download(client, result.source_url(), download_dir / f"{pid}.tar.gz")
        kind = "latex"
    except (httpx.HTTPError, TypeError):  # TypeError: no source URL
        path = _download(client, result.pdf_url, download_dir / f"{pid}.pdf")
        kind = "pdf"
    return Source(pid, path, kind, f"arxiv:{short}", meta)


def arxiv_sources(
    ids: list[str],
    query: str | None,
    max_results: int,
    download_dir: Path,
    *,
    api_url: str = "https://export.arxiv.org/api/query",
    timeout_s: float = 60.0,
) -> tuple[list[Source], list[tuple[str, str]]]:
    """(sources, failures): arXiv papers by ``ids`` and by ``query`` (at most ``max_results``), downloaded;
    ``api_url``: the Atom query API (arXiv's, or a mirror)."""
    if not ids and not query:
        return [], []
    import arxiv

    download_dir.mkdir(parents=True, exist_ok=True)
    api = arxiv.Client(num_retries=1, delay_seconds=3.0)
    api.query_url_format = api_url + "?{}"
    searches = [(f"arxiv:{i}", arxiv.Search(id_list=[i])) for i in ids]
    if query:
        searches.append((f"arxiv:query {query!r}", arxiv.Search(query=query, max_results=max_results)))
    sources: list[Source] = []
    failures: list[tuple[str, str]] = []
    with httpx.Client(timeout=timeout_s) as client:
        for name, search in searches:
            try:
                results = list(api.results(search))
            except Exception as e:  # noqa: BLE001 - the arxiv package raises requests/arxiv errors
                failures.append((name, f"arXiv lookup failed: {type(e).__name__}: {e}"))
                continue
            if not results:
                failures.append((name, "arXiv returned no paper"))
            for result in results:
                try:
                    sources.append(_source_of(result, client, download_dir))
                except (httpx.HTTPError, OSError) as e:
                    failures.append((f"arxiv:{result.get_short_id()}", f"download failed: {e}"))
    return sources, failures

"""One self-contained HTML page (no server, no network) from the viewer's JSON payload.

The payload (``{"title", "trajectories": [...], "grades": [...]}``, see :mod:`klong_megatron.view.data`)
is embedded once as JSON; the page's script renders lazily: the trajectory list, then messages and
windows in chunks of 40 as they scroll into view, token strips and folded texts only when opened. So a
700-turn trajectory costs one JSON parse and 40 cards at load. When the first view is drawn, ``#status``
carries ``data-state="ready"``, the totals (``data-turns``, ``data-windows``, ``data-leaves``), the
number of script errors (``data-errors``) and the time since navigation (``data-ready-ms``): tests and
benchmarks read them from the DOM.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
"""``page.css`` and ``page.js``, inlined into every page."""


@functools.cache
def _assets() -> tuple[str, str]:
    return (ASSETS / "page.css").read_text(), (ASSETS / "page.js").read_text()


def render_page(payload: dict[str, Any], fold_chars: int = 2000) -> str:
    """The whole HTML document for ``payload`` (``{"title", "trajectories", "grades"}``)."""
    css, js = _assets()
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(str(payload.get("title", "klong-view")))
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>klong-view: {title}</title>'
        f"<style>{css}</style></head><body><header><h1>klong-view · {title}</h1>"
        f'<div id="status" data-state="loading"></div></header>'
        f'<div id="layout"><nav id="side"></nav><main id="main"></main></div>'
        f'<script id="klong-data" type="application/json">{data}</script>'
        f"<script>{js.replace('%FOLD%', str(int(fold_chars)))}</script></body></html>"
    )


def write_best_and_worst(trajs: list, renderer: Any, policy: Any, out_dir: Path, label: str) -> list[Path]:
    """Pages of the best and the worst rollout of ``trajs`` (by ``meta.reward``) as
    ``<out_dir>/<label>_{best,worst}.html``; the RL trainer logs them to W&B. Returns the paths written."""
    from klong_megatron.atomic import atomic_output
    from klong_megatron.view.data import trajectory_payload

    if not trajs:
        return []
    ranked = sorted(trajs, key=lambda t: float(t.meta.get("reward", 0.0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for which, traj in (("best", ranked[-1]), ("worst", ranked[0])):
        payload = {"title": f"{label} {which}", "trajectories": [trajectory_payload(traj, renderer, policy)],
                   "grades": []}  # fmt: skip
        path = out_dir / f"{label}_{which}.html"
        with atomic_output(path) as tmp:
            tmp.write_text(render_page(payload), encoding="utf-8")
        paths.append(path)
    return paths

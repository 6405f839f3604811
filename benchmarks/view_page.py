"""How fast a ``klong-view`` page opens: build time, page size and time to first view in headless Chromium.

    python benchmarks/view_page.py [--turns 100 350 700] [--repeats 3]

For each trajectory length (synthetic tool-calling trajectories, byte tokenizer, 4096-token windows with
256 overlap) it builds the page once and loads it ``repeats`` times in Chromium; "ready" is the page's own
``performance.now()`` when the first view is drawn (navigation start -> ready: HTML parse, JSON parse, first
40 cards), read from ``#status``. Baseline in the same run: the same page with every card rendered eagerly
(``CHUNK`` = all), to show what lazy rendering saves. Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.synthetic import tool_trajectory
from klong_megatron.view.data import trajectory_payload
from klong_megatron.view.page import render_page


def ready_ms(chromium: str, page: Path) -> float:
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=300)  # fmt: skip
    tag = out.stdout[out.stdout.index('<div id="status"') :].split(">", 1)[0]
    return float(tag.split('data-ready-ms="', 1)[1].split('"', 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, nargs="+", default=[100, 350, 700])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium (apt-get install chromium)")
    renderer = Renderer(load_tokenizer("byte"))
    policy = ContextPolicy.from_renderer(ContextPolicyConfig(max_len=4096, overlap=256), renderer)
    table = Table(title="klong-view page: build and open (median of repeats)")
    for col in ("turns", "tokens", "windows", "page MB", "build s", "ready ms (lazy)", "ready ms (eager)"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp, Console().status("building and loading pages ..."):
        for turns in args.turns:
            t0 = time.perf_counter()
            payload = {"title": f"{turns} turns", "grades": [],
                       "trajectories": [trajectory_payload(tool_trajectory(turns), renderer, policy)]}  # fmt: skip
            html = render_page(payload)
            build = time.perf_counter() - t0
            lazy, eager = Path(tmp, f"lazy{turns}.html"), Path(tmp, f"eager{turns}.html")
            lazy.write_text(html, encoding="utf-8")
            eager.write_text(html.replace("const CHUNK = 40,", "const CHUNK = 1e9,"), encoding="utf-8")
            t = payload["trajectories"][0]
            lazy_ms, eager_ms = ([ready_ms(chromium, p) for _ in range(args.repeats)] for p in (lazy, eager))
            table.add_row(str(turns), f"{len(t['tok']):,}", str(len(t["windows"])), f"{len(html) / 1e6:.1f}",
                          f"{build:.2f}", *(f"{statistics.median(ms):.0f}" for ms in (lazy_ms, eager_ms)))  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()

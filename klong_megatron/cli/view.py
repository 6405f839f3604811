"""``klong-view``: one self-contained HTML page (opens from disk) for trajectories, rollouts and grades.

    klong-view traj.jsonl -o traj.html --tokenizer path/to/tok --max-len 8192 --overlap 512
    klong-view runs/rl/rollouts -o rollouts.html             # a rollout store (every *.jsonl in it)
    klong-view sub.grade.json --rubric rubric.json -o grade.html
    klong-view traj.jsonl --serve 8000                      # also serve the page over HTTP

Inputs: trajectory JSONL files (SFT data or rollout records: records show their exact token stream,
sampled log-probs, policy versions and timings), directories of them (a rollout store), and judge
results (``*.grade.json``, with the rubric tree when ``--rubric`` is given). Windows are those of the
context policy given by the split flags (the same flags as ``klong-data split``); ``--max-len 0``
shows none. ``--limit`` caps the trajectories per page (default 200; the page lists them by reward).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import sys
from pathlib import Path

from rich.console import Console

from klong_megatron.atomic import atomic_output
from klong_megatron.cli._errors import one_line_errors
from klong_megatron.cli.data import _policy, _policy_args
from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.trajectory import Trajectory, read_trajectories
from klong_megatron.errors import UserError
from klong_megatron.view.data import grade_payload, trajectory_payload
from klong_megatron.view.page import render_page

console = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="klong-view", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("inputs", nargs="+", type=Path, help="trajectory JSONL files, rollout dirs, *.grade.json")
    ap.add_argument("-o", "--out", type=Path, default=Path("klong-view.html"))
    ap.add_argument("--tokenizer", default="byte", help='local HF tokenizer directory or "byte"')
    ap.add_argument("--rubric", type=Path, default=None, help="rubric.json for the grade files")
    ap.add_argument("--limit", type=int, default=200, help="at most this many trajectories on the page")
    ap.add_argument("--serve", type=int, default=None, metavar="PORT", help="serve the page on this port")
    _policy_args(ap)
    return ap


def _files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(trajectory JSONL files, grade JSON files) from files and directories."""
    traj, grades = [], []
    for p in paths:
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise UserError(f"{p}: directory holds no *.jsonl trajectory files")
            traj += found
        elif not p.exists():
            raise FileNotFoundError(2, "No such file or directory", str(p))
        elif p.suffix == ".json":
            grades.append(p)
        else:
            traj.append(p)
    return traj, grades


def _grade(path: Path, rubric: dict | None) -> dict:
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not JSON: {e.msg}") from None
    if not isinstance(result, dict) or "leaves" not in result:
        raise UserError(f"{path}: not a judge result (no 'leaves'; expected a *.grade.json)")
    return {"label": path.name, **grade_payload(result, rubric)}


def build(args: argparse.Namespace) -> dict:
    """The page payload for the parsed arguments."""
    traj_files, grade_files = _files(args.inputs)
    rubric = json.loads(args.rubric.read_text()) if args.rubric else None
    trajs: list[Trajectory] = list(read_trajectories([str(f) for f in traj_files])) if traj_files else []
    trajs.sort(key=lambda t: -float(t.meta.get("reward", 0.0)))  # best first; SFT data keeps its order
    if len(trajs) > args.limit:
        console.print(f"showing {args.limit} of {len(trajs)} trajectories (--limit)")
        trajs = trajs[: args.limit]
    renderer = Renderer(load_tokenizer(args.tokenizer))
    policy = _policy(args, renderer) if args.max_len > 0 else None
    return {
        "title": ", ".join(p.name for p in args.inputs),
        "trajectories": [trajectory_payload(t, renderer, policy) for t in trajs],
        "grades": [_grade(p, rubric) for p in grade_files],
    }


def write_page(payload: dict, out: Path) -> Path:
    """Write the page atomically; returns ``out``."""
    with atomic_output(out) as tmp:
        tmp.write_text(render_page(payload), encoding="utf-8")
    return out


def _serve(page: Path, port: int) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(page.parent.resolve()))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as httpd:
        console.print(f"serving http://127.0.0.1:{httpd.server_address[1]}/{page.name} (Ctrl-C stops)")
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


@one_line_errors("klong-view")
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    payload = build(args)
    out = write_page(payload, args.out)
    n = sum(len(t["messages"]) for t in payload["trajectories"])
    console.print(
        f"{len(payload['trajectories'])} trajectories ({n} messages), {len(payload['grades'])} grades -> {out}"
    )
    if args.serve is not None:
        _serve(out, args.serve)
    sys.exit(0)


if __name__ == "__main__":
    main()

"""``klong-data`` end to end on a small slice of the bundled demo set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from klong_megatron.data.demo_tasks import DEMO_TRAJECTORIES


def klong_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "klong_megatron.cli.data", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "traj.jsonl"
    lines = DEMO_TRAJECTORIES.read_text().splitlines()
    p.write_text("\n".join(sorted(lines, key=len)[:3]) + "\n")
    return p


def test_render_split_pack_stats(small: Path, tmp_path: Path) -> None:
    r = klong_data("render", "--input", str(small), "--out", str(tmp_path / "r.jsonl"))
    assert r.returncode == 0, r.stderr
    rendered = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rendered) == 3 and {"trajectory_id", "input_ids", "assistant_mask"} <= rendered[0].keys()
    r = klong_data(
        "split",
        "--input",
        str(small),
        "--out",
        str(tmp_path / "w.jsonl"),
        "--max-len",
        "1024",
        "--overlap",
        "64",
        "--keep-full-turns",
        "2",
        "--prefix-turns",
        "1",
        "--train-overlap",
    )
    assert r.returncode == 0, r.stderr
    windows = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(windows) > 3
    for w in windows:
        assert {"trajectory_id", "window_index", "input_ids", "loss_mask", "prefix_len", "positions"} <= w.keys()
        assert len(w["input_ids"]) == len(w["loss_mask"]) == len(w["positions"]) <= 1024
    full = {x["trajectory_id"]: x["input_ids"] for x in rendered}
    w = windows[1]
    assert all(full[w["trajectory_id"]][p] == t for p, t in zip(w["positions"], w["input_ids"], strict=True) if p >= 0)
    r = klong_data(
        "pack", "--input", str(tmp_path / "w.jsonl"), "--out", str(tmp_path / "p.jsonl"), "--seq-len", "4096"
    )
    assert r.returncode == 0 and "sequences of 4096" in r.stderr
    r = klong_data("stats", "--input", str(small), "--max-len", "1024", "--seq-len", "4096")
    assert r.returncode == 0 and "redundancy" in r.stdout and "packing efficiency" in r.stdout


def test_bad_input_names_file_line_field_and_skip_invalid_counts(small: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = small.read_text().splitlines()[0]
    bad.write_text(good + "\n" + json.dumps({"id": "b", "messages": [{"role": "wizard"}]}) + "\n")
    r = klong_data("split", "--input", str(bad), "--out", str(tmp_path / "w.jsonl"))
    assert r.returncode == 2 and f"{bad}:2" in r.stderr and "role" in r.stderr
    r = klong_data("split", "--input", str(bad), "--out", str(tmp_path / "w.jsonl"), "--skip-invalid")
    assert r.returncode == 0 and "skipped 1 invalid" in r.stderr

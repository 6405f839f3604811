"""Every ``klong-*`` command meets a missing file, a wrong flag and malformed input the same way: one line
``<prog>: error: ...`` naming what is wrong and where, exit status 2, no traceback, no partial output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fixtures(tmp: Path) -> dict[str, str]:
    bad_jsonl = tmp / "bad.jsonl"
    good = '{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}'
    bad_jsonl.write_text(good + "\n" + '{"id": "b", "messages": [{"role": "wizard", "content": "x"}]}\n')
    bad_json = tmp / "bad.grade.json"
    bad_json.write_text('{"score": 0.5,\n "leaves": ')
    return {"bad_jsonl": str(bad_jsonl), "bad_json": str(bad_json), "out": str(tmp / "out.file"), "tmp": str(tmp)}


# (module, argv, what the one line must name); {name} are filled from _fixtures.
CASES = [
    ("data", ["split", "--input", "{tmp}/missing.jsonl", "--out", "{out}"], "missing.jsonl"),
    ("data", ["split", "--input", "{bad_jsonl}", "--out", "{out}"], "bad.jsonl:2"),
    ("data", ["split", "--max-lenn", "5", "--out", "{out}"], "--max-lenn"),
    ("sft", ["nosuchkey=1"], "nosuchkey"),
    ("sft", ["trainer.lr=fast"], "trainer.lr"),
    ("sft", ["data.train_files=[{tmp}/missing.jsonl]", "dry_run=true"], "missing.jsonl"),
    ("rl", ["experiment=no_such_preset"], "no_such_preset"),
    ("rl", ["stages=oops"], "stages"),
    ("eval", ["tasks=[{tmp}/no_task_dir]", "dry_run=true"], "no_task_dir"),
    ("judge", ["{tmp}", "{tmp}/no_rubric.json"], "no_rubric.json"),
    ("devserver", ["--model", "{tmp}/no_model"], "no_model"),
    ("view", ["{tmp}/missing.jsonl", "-o", "{out}"], "missing.jsonl"),
    ("view", ["{bad_json}", "-o", "{out}"], "bad.grade.json:2"),
    ("convert", ["hf-to-dist", "{tmp}/no_hf_model", "{out}"], "no_hf_model"),
    ("convert", ["dist-to-hf", "{tmp}", "{out}"], "no dist checkpoint"),
]


@pytest.mark.parametrize(("module", "argv", "names"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_user_error_is_one_line_exit_2_and_leaves_no_output(tmp_path: Path, module: str, argv: list[str], names: str):
    fx = _fixtures(tmp_path)
    args = [a.format(**fx) for a in argv]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", f"klong_megatron.cli.{module}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = err[-1]
    assert last.startswith(f"klong-{module}: error: ") and names in last, out.stderr[-3000:]
    usage = [line for line in err[:-1] if not line.startswith(("usage:", " "))]
    assert not usage, f"more than the one error line (and argparse's usage): {err}"
    assert not Path(fx["out"]).exists() and not list(tmp_path.glob(".out.file.tmp*")), "partial output left behind"

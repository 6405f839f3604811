"""Evidence rules (judge/evidence.py, judge/submission.py) on real files, as PaperBench's judge applies them.

Reference: openai/preparedness project/paperbench/paperbench/judge/simple.py (_get_whitelisted_files,
_truncate_input, _get_available_context), judge/base.py (log creation time), judge/utils.py (reduce_log).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from klong_megatron.judge import evidence
from klong_megatron.judge.submission import Submission, TokenCounter

QWEN3 = Path(__file__).resolve().parents[3] / "shared" / "real_tokenizers" / "qwen3"


@pytest.fixture(scope="module")
def qwen3() -> TokenCounter:
    return TokenCounter(QWEN3)


def _files(root: Path, files: dict[str, float]) -> Submission:
    for rel, mtime in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel}\n")
        os.utime(root / rel, (mtime, mtime))
    return Submission(root)


def test_category_files_follow_paperbench_extension_sets_and_skipped_dirs(tmp_path: Path) -> None:
    sub = _files(tmp_path, {
        "README.md": 10, "notes.txt": 10, "train.py": 10, "run.sh": 10, "cfg.yaml": 10, "old.csv": 10,
        "out/new.csv": 30, "out/plot.png": 30, "out/metrics.json": 30, "reproduce.meta.json": 30,
        "pkg.egg-info/PKG-INFO.txt": 10, "wandb/run/log.txt": 30, "venv2/x.py": 10, "deep/a/b/c/d/e.py": 10,
    })  # fmt: skip
    dev = evidence.category_files(sub, "Code Development", 20)
    assert dev == evidence.category_files(sub, "Code Execution", 20)
    assert set(dev) == {"README.md", "notes.txt", "train.py", "run.sh", "cfg.yaml", "out/metrics.json",
                        "deep/a/b/c/d/e.py"}  # fmt: skip
    ra = evidence.category_files(sub, "Result Analysis", 20)
    assert set(ra) == {"README.md", "notes.txt", "out/new.csv", "out/metrics.json"}  # docs + tables at/after 20
    assert evidence.results_touched(sub, ra, 20)
    assert not evidence.results_touched(sub, evidence.category_files(sub, "Result Analysis", 40), 40)
    assert set(evidence.category_files(sub, "Result Analysis", None)) == {"README.md", "notes.txt"}
    assert not evidence.results_touched(sub, ["README.md"], None)  # no reproduction log: nothing to analyse


def test_log_creation_time_from_meta_then_creation_file_then_log_mtime(tmp_path: Path) -> None:
    sub = _files(tmp_path, {"reproduce.log": 500})
    assert sub.log_created_at() == 500  # PaperBench's fallback: the log's mtime
    (tmp_path / "reproduce.log.creation_time").write_text("400\n")
    assert Submission(tmp_path).log_created_at() == 400
    (tmp_path / "reproduce.meta.json").write_text(json.dumps({"log_created_at": 300.5, "exit_code": 0}))
    assert Submission(tmp_path).log_created_at() == 300.5
    (tmp_path / "reproduce.meta.json").write_text(json.dumps({"exit_code": 0}))
    with pytest.raises(ValueError, match=r"reproduce\.meta\.json: field 'log_created_at'"):
        Submission(tmp_path).log_created_at()
    assert _files(tmp_path / "empty", {"a.py": 1}).log_created_at() is None


def test_reduce_log_collapses_runs_of_one_template() -> None:
    log = "start\n" + "".join(f"step {i} loss {1 / (i + 1):.3f} at 12:00:{i % 60:02d}\n" for i in range(500))
    log += "".join(f"{p}%|{'█' * (p // 10)}| {p}/100 [00:01, 3.2MB/s]\n" for p in range(0, 100, 5)) + "done 0.93\n"
    out = evidence.reduce_log(log).splitlines()
    assert out == ["start", "step 0 loss 1.000 at 12:00:00", "  (repeated 500 times)",
                   "0%|| 0/100 [00:01, 3.2MB/s]", "  (repeated 20 times)", "done 0.93"]  # fmt: skip
    assert evidence.reduce_log("a\nb\na\n") == "a\nb\na"


def test_budgets_follow_the_window_with_the_real_tokenizer(qwen3: TokenCounter) -> None:
    c = qwen3
    paper = "The method trains a probe on the residual stream. " * 200
    log = "".join(f"line {i}: value {i * 7} unique token{i}\n" for i in range(1200))
    b = evidence.plan_budgets(c, window=16_000, reserve=4_000, paper=paper, addendum="A note.", log=log)
    assert b.log_tokens <= 8_000 + 20 and "characters of the log omitted" in b.log  # head + tail halves
    assert b.log.startswith("line 0:") and b.log.rstrip().endswith("token1199")
    dev = 16_000 - b.paper_tokens - c.count("A note.") - 4_000 - 2_000
    assert b.files["Code Development"] == dev and b.files["Result Analysis"] == max(dev - b.log_tokens, 0)
    small = evidence.plan_budgets(c, window=9_000, reserve=1_000, paper=paper * 3, addendum="", log=log)
    assert small.paper_tokens + small.log_tokens <= 9_000  # the log, then the paper, cut to fit
    assert all(v >= 0 for v in small.files.values())


def test_pack_files_keeps_rank_order_cuts_the_overflowing_file_and_shows_at_most_ten(tmp_path: Path, qwen3) -> None:
    for i in range(12):
        (tmp_path / f"f{i:02d}.py").write_text(f"x{i} = 1\n" * 20)
    (tmp_path / "big.py").write_text("y = 2\n" * 2000)
    sub, c = Submission(tmp_path), qwen3
    text, shown = evidence.pack_files(c, sub, ["f03.py", "big.py", "f00.py"], 400)
    assert shown == ["f03.py", "big.py"] and text.startswith("<FILE:f03.py>") and c.count(text) <= 400
    assert "</FILE:big.py>" not in text  # cut at a line inside the overflowing file
    _, ten = evidence.pack_files(c, sub, [f"f{i:02d}.py" for i in range(12)], 100_000)
    assert len(ten) == 10

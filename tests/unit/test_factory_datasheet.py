"""The distillation datasheet (factory/datasheet.py): histogram bins, counts, token cost, Markdown."""

from __future__ import annotations

from klong_megatron.factory.datasheet import build_datasheet, count_histogram, render_markdown, score_histogram
from klong_megatron.factory.select import Decision


def test_histograms_put_edges_in_the_right_bins() -> None:
    h = score_histogram([0.0, 0.05, 0.1, 0.99, 1.0])
    assert h["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2] and len(h["edges"]) == 11
    c = count_histogram([0, 1, 2, 3, 4, 100])
    assert c["edges"] == [0, 1, 2, 4, 8, 16, 32, 64, 128] and c["counts"] == [1, 1, 2, 1, 0, 0, 0, 1]
    assert count_histogram([]) == {"edges": [0, 1], "counts": [0]}


def test_datasheet_counts_costs_and_failures() -> None:
    def meta(reward: float, turns: int) -> dict:
        usage = {"calls": 3, "prompt_tokens": 100, "completion_tokens": 10}
        return {"task": "a", "reward": reward, "turns": turns, "tokens": 50, "prompt_tokens": 500,
                "finish_reason": "submitted", "judge_token_usage": usage}  # fmt: skip

    graded = [{"id": "a/0", "meta": meta(1.0, 9)}, {"id": "a/1", "meta": meta(0.2, 3)}]
    decisions = [Decision("a/0", "a", 1.0, True, "kept"), Decision("a/1", "a", 0.2, False, "below_threshold")]
    failures = [{"id": "b/0", "task": "b", "errors": ["SandboxError: bwrap died", "ChatEngineError: HTTP 500"]}]
    sheet = build_datasheet(["a", "b"], 2, graded, failures, decisions, student_tokens={"a/0": 1234})
    assert sheet["attempts"] == {"planned": 4, "graded": 2, "failed": 1, "pending": 1, "kept": 1}
    assert sheet["decisions"]["kept"] == 1 and sheet["decisions"]["below_threshold"] == 1
    assert sheet["failure_kinds"] == {"ChatEngineError": 1}
    cost = sheet["cost_tokens"]
    assert (cost["teacher_prompt"], cost["teacher_completion"], cost["judge_calls"]) == (1000, 100, 6)
    assert cost["total"] == 1000 + 100 + 200 + 20 == cost["per_kept"]
    rows = {p["task"]: p for p in sheet["per_paper"]}
    assert rows["a"]["mean_score"] == 0.6 and rows["b"]["failed"] == 1 and rows["b"]["best_score"] is None
    assert sheet["histograms"]["turns_kept"]["counts"][-1] == 1 and sheet["student_tokens_kept"] == 1234
    md = render_markdown(sheet)
    assert "**kept 1**" in md and "| [0.9, 1] | 1 |" in md and "b/0: SandboxError: bwrap died | ChatEngineError" in md

"""``klong-view`` pages opened in real headless Chromium: a 700-turn trajectory with its windows, a rollout
record's sampled log-probs and policy versions, and a real PaperBench rubric tree with grades."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from rollout_doubles import ScriptedEngine
from test_rollout_agent import RENDERER, TOK, EchoTools, long_script, policy, rollout_cfg, task

from klong_megatron.cli.view import main as view_main
from klong_megatron.config.data import ContextPolicyConfig
from klong_megatron.config.rollout import SamplingConfig
from klong_megatron.data.context import ContextPolicy
from klong_megatron.data.split import split_trajectory
from klong_megatron.data.synthetic import tool_trajectory
from klong_megatron.data.trajectory import write_jsonl
from klong_megatron.judge.rubric import load_rubric
from klong_megatron.rollout.agent import AgentLoop

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT.parent / "shared" / "data" / "paperbench_tasks" / "mechanistic-understanding"


def open_page(chromium: str, page: Path, fragment: str = "", shot: Path | None = None) -> dict[str, str]:
    """Load ``page`` in headless Chromium; the ``#status`` element's data attributes. Fails on script errors."""
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000"]
    url = page.resolve().as_uri() + fragment
    out = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Uncaught" not in out.stderr, out.stderr[-2000:]
    if shot is not None:
        subprocess.run(
            [*base, "--window-size=1280,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120
        )
        assert shot.stat().st_size > 10_000, "screenshot is (nearly) empty"
        print(f"screenshot: {shot}")
    tag = out.stdout[out.stdout.index('<div id="status"') :].split(">", 1)[0]
    attrs = dict(part.split("=", 1) for part in tag.split()[2:])
    return {k.removeprefix("data-"): v.strip('"') for k, v in attrs.items()}


@pytest.mark.browser
def test_700_turn_trajectory_page_shows_every_turn_and_window(tmp_path: Path, chromium_bin: str) -> None:
    traj = tool_trajectory(700)
    write_jsonl(tmp_path / "long.jsonl", [traj.to_json()])
    with pytest.raises(SystemExit) as done:
        view_main([str(tmp_path / "long.jsonl"), "-o", str(tmp_path / "long.html"), "--max-len", "4096",
                   "--overlap", "256", "--keep-full-turns", "8"])  # fmt: skip
    assert done.value.code == 0
    cfg = ContextPolicyConfig(max_len=4096, overlap=256, keep_full_turns=8)
    windows = split_trajectory(RENDERER.render(traj), ContextPolicy.from_renderer(cfg, RENDERER))

    status = open_page(chromium_bin, tmp_path / "long.html", shot=tmp_path / "long.png")
    assert status["state"] == "ready" and status["errors"] == "0"
    assert status["turns"] == str(len(traj.messages)) == "1402"
    assert status["windows"] == str(len(windows)) and len(windows) > 20
    assert 0 < int(status["rendered"]) <= 40  # lazy: only the first chunk of cards is built at load

    opened = open_page(chromium_bin, tmp_path / "long.html", "#windows-open")
    assert opened["errors"] == "0" and opened["strips"] == "1"
    assert int(opened["strip-tokens"]) >= len(windows[0]) - 2  # the first window's tokens (+ boundaries)


@pytest.mark.browser
def test_rollout_record_page_has_sampled_logprobs_and_policy_versions(tmp_path: Path, chromium_bin: str) -> None:
    engine = ScriptedEngine(TOK, long_script)
    cfg = rollout_cfg(tmp_path, sampling=SamplingConfig(max_new_tokens=120), max_turns=8)
    traj = asyncio.run(AgentLoop(engine, RENDERER, policy(max_len=700, overlap=120, reserve=150), cfg).run(
        task(), EchoTools()))  # fmt: skip
    traj.meta["reward"] = 0.25
    (tmp_path / "rollouts").mkdir()
    write_jsonl(tmp_path / "rollouts" / "stage0_iter0000.jsonl", [traj.to_json()])
    with pytest.raises(SystemExit):
        view_main([str(tmp_path / "rollouts"), "-o", str(tmp_path / "r.html"), "--max-len", "700",
                   "--overlap", "120", "--gen-reserve", "150"])  # fmt: skip
    html = (tmp_path / "r.html").read_text()
    data = json.loads(html.split('type="application/json">', 1)[1].split("</script>", 1)[0].replace("<\\/", "</"))
    (t,) = data["trajectories"]
    assert t["kind"] == "rollout" and t["summary"]["reward"] == 0.25
    assert len(t["steps"]) == len(traj.meta["steps"]) == 8
    for step in traj.meta["steps"]:
        shown = t["steps"][str(step["message"])]
        assert shown["version"] == "scripted-0" and shown["logprobs"] == [round(x, 3) for x in step["logprobs"]]
        assert "".join(shown["tokens"]) == TOK.decode(step["output_ids"], skip_special_tokens=False)
    status = open_page(chromium_bin, tmp_path / "r.html", "#open")
    assert status["errors"] == "0" and status["turns"] == str(len(traj.messages))


@pytest.mark.browser
def test_grade_page_shows_the_real_rubric_tree_with_every_leaf(tmp_path: Path, chromium_bin: str) -> None:
    rubric = load_rubric(TASK / "rubric.json")
    leaves = list(rubric.leaves())
    grades = {
        leaf.id: {
            "leaf_id": leaf.id,
            "score": float(i % 2) if i % 7 else None,
            "valid": bool(i % 7),
            "explanation": f"explanation {i}",
            "grader": "test",
        }  # fmt: skip
        for i, leaf in enumerate(leaves)
    }
    result = {"score": 0.5, "per_category": {"Code Development": 0.5}, "leaves": grades, "rubric_id": rubric.id,
              "invalid": [k for k, g in grades.items() if not g["valid"]], "node_scores": {rubric.id: 0.5}}  # fmt: skip
    (tmp_path / "sub.grade.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit):
        view_main(
            [str(tmp_path / "sub.grade.json"), "--rubric", str(TASK / "rubric.json"), "-o", str(tmp_path / "g.html")]
        )
    status = open_page(chromium_bin, tmp_path / "g.html", shot=tmp_path / "g.png")
    assert status["errors"] == "0" and status["leaves"] == str(len(leaves)) == "96"

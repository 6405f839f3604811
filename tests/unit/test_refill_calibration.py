"""benchmarks/refill_calibration.py: how the engine double tells rollouts apart, and the slot overhead."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import refill_calibration as cal  # noqa: E402
import rl_pipeline_sim as sim  # noqa: E402

from klong_megatron.data.render import Renderer, load_tokenizer  # noqa: E402


def test_a_rollout_stays_one_rollout_when_its_context_is_cut_and_samples_of_a_group_are_told_apart() -> None:
    tok = load_tokenizer("demo_bpe")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    double = cal.TrainerEngineServer(sim.SimParams(timeout_s=60.0), 0.0, tok, Renderer(tok).eot_id, 0.0)
    try:
        prompt = enc("Task 1: reproduce the paper.")
        gen = lambda ids: double.route("/generate", {"input_ids": ids})[1]["output_ids"]  # noqa: E731
        a1 = gen(prompt)  # sample 0 of the group
        b1 = gen(prompt)  # sample 1: the same prompt, another rollout
        a2 = gen(prompt + a1 + enc("ok"))  # sample 0 continues
        cut = gen(prompt + enc("[older turns truncated]") + a2 + enc("ok"))  # the context policy cut its history
        b2 = gen(prompt + b1 + enc("ok"))
        assert "[rollout 0 turn 1]" in tok.decode(a1) and "[rollout 1 turn 1]" in tok.decode(b1)
        assert "[rollout 0 turn 3]" in tok.decode(cut) and "[rollout 1 turn 2]" in tok.decode(b2)
        assert len(double.rollouts) == 2
    finally:
        double.http.shutdown()


def test_slot_overhead_is_slot_time_beyond_first_request_to_last_reply() -> None:
    steps = [{"t_s": 0.3, "gen_s": 1.0}, {"t_s": 1.5, "gen_s": 2.0}]  # first request at 0.3 s, last reply 3.5 s
    done = {"meta": {"slot_s": 3.6, "steps": steps, "timed_out": False}}  # 0.4 s beyond 0.3 .. 3.5
    cut = {"meta": {"slot_s": 8.5, "steps": steps, "timed_out": True}}  # live until the 8 s timeout: 0.8 s beyond
    ungraded = {"meta": {"steps": steps}}  # no slot time recorded (not from the rollout service): ignored
    assert cal.slot_overhead([done, cut, ungraded], timeout_s=8.0) == pytest.approx((0.4 + 0.8) / 2)

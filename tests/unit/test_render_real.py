"""The canonical token stream on the model families' REAL chat templates (../shared/real_tokenizers: Qwen2.5,
Qwen3, Llama-3.1 with their real vocabularies, GLM-4.5 with its real template; see each SOURCE.txt).

Checked per family: the stream equals apply_chat_template(messages, tools=...) where the template does not
rewrite history; the assistant mask is exactly what the model generates, stop token included; the agent loop's
incremental pieces (prompt, generation prompt, engine output, suffix, observations) equal the SFT stream turn by
turn; tool schemas land in the prompt; template refusals are one-line errors naming file:line, trajectory id,
message index and the template's message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from klong_megatron.data.render import Renderer, RenderError, load_tokenizer, render_all
from klong_megatron.data.trajectory import Message, ReadStats, ToolCall, read_trajectories
from klong_megatron.sandbox.tools import SPECS

REAL = Path(__file__).resolve().parents[3] / "shared" / "real_tokenizers"
FAMILIES = ["qwen2.5", "qwen3", "llama3.1", "glm4.5"]
TOOLS = [{"type": "function", "function": {"name": n, **spec}} for n, spec in SPECS.items()]
STOP = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.1": "<|eot_id|>"}
HEADER = {
    "qwen2.5": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "llama3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "glm4.5": "<|assistant|>",
}

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real tokenizers not found at {REAL}")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[str, Renderer]:
    return request.param, Renderer(load_tokenizer(str(REAL / request.param)))


def _call(cid: str, **args) -> ToolCall:
    return ToolCall("bash", json.dumps(args, ensure_ascii=False), cid)


def conversation(parallel: bool, system: bool = True) -> list[Message]:
    """Several tool calls per turn (unless ``parallel`` is False: Llama-3.1 allows one), tool-call-only turns
    with null content, reasoning on some turns only, a follow-up user message, unicode, a long tool output."""
    long_output = "\n".join(f"line {k}: loss={1 / (k + 1):.6f} ✓ θ" for k in range(300))
    msgs = [Message("system", "You reproduce ML papers. Be careful.")] if system else []
    msgs.append(Message("user", "Reproduce the paper in paper.md — résumé: 数据 and ünïcode."))
    msgs.append(Message("assistant", "Let me read the paper.", (_call("c1", command="cat paper.md"),)))
    msgs.append(Message("tool", long_output, tool_call_id="c1"))
    two = (_call("c2", command="ls"), _call("c3", command="nproc")) if parallel else (_call("c2", command="ls"),)
    msgs.append(Message("assistant", "", two, reasoning="I need the file list and the CPU count."))
    msgs += [Message("tool", f"output of {c.id}: ok", tool_call_id=c.id) for c in two]
    msgs.append(Message("assistant", "", (_call("c4", command="python train.py"),)))  # tool call only, no text
    msgs.append(Message("tool", "step 1 loss 0.5", tool_call_id="c4"))
    msgs.append(Message("assistant", "Training finished; the loss is 0.5."))
    msgs.append(Message("user", "Also report the accuracy, please."))
    msgs.append(Message("assistant", "", (_call("c5", command="python eval.py"),), reasoning="Run the eval."))
    msgs.append(Message("tool", "accuracy 0.91", tool_call_id="c5"))
    msgs.append(Message("assistant", "The accuracy is 0.91."))
    return msgs


def _msgs(name: str, system: bool = True) -> list[Message]:
    return conversation(parallel=name != "llama3.1", system=system)


@pytest.mark.parametrize("system", [True, False])
def test_stream_equals_whole_rendering_where_the_template_keeps_history(family, system: bool) -> None:
    name, r = family
    msgs = _msgs(name, system)
    rt = r.render(msgs, "t", tools=TOOLS)
    assert rt.spans[0, 0] == 0 and rt.spans[-1, 1] == len(rt.input_ids)
    assert (rt.spans[1:, 0] == rt.spans[:-1, 1]).all()
    whole = r.encode(r.text(msgs, tools=TOOLS))
    if name in ("qwen2.5", "llama3.1"):
        assert rt.input_ids.tolist() == whole
    else:  # Qwen3 drops earlier turns' think blocks, GLM-4.5 earlier reasoning: the stream keeps them
        assert len(rt.input_ids) > len(whole)


def test_template_calls_equal_apply_chat_template_on_every_prefix(family) -> None:
    # The renderer calls the compiled template itself, with the tool schemas made plain once (render.py
    # _TemplateCall): on the real templates it must write exactly what apply_chat_template writes.
    name, r = family
    assert r._call is not None, "the probe should accept every real template"
    chat = [m.to_openai() for m in _msgs(name)]

    def outcome(fn, *args, **kw) -> str:
        try:
            return fn(*args, **kw)
        except Exception as e:  # a template refusal (Llama-3.1: tools need a first user message) must match too
            return f"{type(e).__name__}: {e}"

    tok = r.tokenizer
    for k in range(1, len(chat) + 1):
        for tools in (None, TOOLS):
            for gen in (False, True):
                want = outcome(
                    tok.apply_chat_template, chat[:k], tools=tools, tokenize=False, add_generation_prompt=gen
                )
                assert outcome(r._call, chat[:k], tools, gen) == want, (k, tools is not None, gen)


def test_a_template_call_that_renders_differently_falls_back_to_apply_chat_template(monkeypatch) -> None:
    from klong_megatron.data import render

    tok = load_tokenizer(str(REAL / "qwen3"))
    monkeypatch.setattr(render._TemplateCall, "__call__", lambda self, chat, tools, gen: "different")
    r = Renderer(tok)
    assert r._call is None
    msgs = _msgs("qwen3")[:2]
    assert r.text(msgs, tools=TOOLS) == tok.apply_chat_template(
        [m.to_openai() for m in msgs], tools=TOOLS, tokenize=False
    )


def test_assistant_mask_is_what_the_model_generates_with_its_stop_token(family) -> None:
    name, r = family
    msgs = _msgs(name)
    rt = r.render(msgs, "t", tools=TOOLS)
    tok = r.tokenizer
    for i, m in enumerate(msgs):
        s, e = rt.spans[i]
        ids, mask = rt.input_ids[s:e], rt.assistant_mask[s:e]
        if m.role != "assistant":
            assert not mask.any(), f"message {i} ({m.role}) is not generated"
            continue
        on = np.nonzero(mask)[0]
        assert len(on) and on[-1] - on[0] + 1 == len(on), f"turn {i}: one contiguous generated run"
        assert tok.decode(ids[: on[0]]).endswith(HEADER[name]), "header (generation prompt) is never trained"
        generated = tok.decode(ids[on])
        nxt = msgs[i + 1].role if i + 1 < len(msgs) else None
        stop = STOP.get(name) or ("<|observation|>" if nxt == "tool" else "<|user|>")
        assert generated.endswith(stop) and ids[on[-1]] in r.stop_ids, f"turn {i} ends with {stop}"
        assert generated.count(stop) == 1
        if m.content and not (name == "llama3.1" and m.tool_calls):  # Llama-3.1 writes only the call
            assert m.content in generated
        for c in m.tool_calls:
            assert json.loads(c.arguments)["command"] in generated
        if m.reasoning and name in ("qwen3", "glm4.5"):  # Qwen2.5 and Llama-3.1 templates drop reasoning
            assert m.reasoning in generated
        if name == "qwen3":  # every turn as generated: a think block, empty when the turn had no reasoning
            assert generated.startswith("<think>\n")
        assert len(ids) - on[-1] - 1 == len(r.assistant_suffix())


def test_agent_incremental_rendering_equals_the_sft_stream(family) -> None:
    """What the agent loop feeds the model, piece by piece (prompt; per turn: generation prompt, engine
    output ids ending with the stop token, suffix; observations), equals the SFT stream message by message."""
    name, r = family
    msgs = _msgs(name)
    rt = r.render(msgs, "t", tools=TOOLS)
    first = next(i for i, m in enumerate(msgs) if m.role == "assistant")
    pieces = [rt.message_ids(k) for k in range(first)]
    assert np.concatenate(pieces).tolist() == r.render(msgs[:first], tools=TOOLS).input_ids.tolist()
    i = first
    while i < len(msgs):
        s, e = rt.spans[i]
        engine_output = rt.input_ids[s:e][rt.assistant_mask[s:e] == 1]  # token-out: the sampled ids
        header = r.generation_prompt(msgs[:i], TOOLS)
        turn = np.concatenate([header, engine_output, r.assistant_suffix()])
        assert turn.tolist() == rt.message_ids(i).tolist(), f"turn {i}"
        head, gen, _ = r.assistant_pieces(msgs[:i], msgs[i], TOOLS)
        want = engine_output if r.writes_stop else engine_output[:-1]
        assert r.encode(head) == header.tolist() and r.encode(gen) == want.tolist()
        j = next((k for k in range(i + 1, len(msgs)) if msgs[k].role == "assistant"), len(msgs))
        if j > i + 1:
            new = r.render_new(msgs[: i + 1], msgs[i + 1 : j], TOOLS)
            assert [p.tolist() for p in new] == [rt.message_ids(k).tolist() for k in range(i + 1, j)]
        i = j


def test_tool_schemas_are_in_the_prompt(family) -> None:
    name, r = family
    msgs = _msgs(name)
    with_tools, without = r.render(msgs, "t", tools=TOOLS), r.render(msgs, "t")
    added = len(with_tools.input_ids) - len(without.input_ids)
    assert 150 < added < 3000, f"{name}: tools add {added} tokens"
    first = next(i for i, m in enumerate(msgs) if m.role == "assistant")
    prompt = r.tokenizer.decode(with_tools.input_ids[: with_tools.spans[first, 0]])
    assert all(t["function"]["description"].split(".")[0] in prompt for t in TOOLS)


def _jsonl(tmp_path: Path, trajs: list[dict]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(t) + "\n" for t in trajs))
    return p


def test_llama_refusal_names_file_line_trajectory_message_and_reason(tmp_path: Path) -> None:
    r = Renderer(load_tokenizer(str(REAL / "llama3.1")))
    good = {"id": "ok", "messages": [m.to_json() for m in conversation(parallel=False)], "tools": TOOLS}
    bad = {"id": "two-calls", "messages": [m.to_json() for m in conversation(parallel=True)], "tools": TOOLS}
    path = _jsonl(tmp_path, [good, bad, good])
    with pytest.raises(RenderError) as e:
        list(render_all(read_trajectories(path), r))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:2: trajectory 'two-calls': message 4 (assistant)")
    assert "This model only supports single tool-calls at once!" in msg
    stats = ReadStats()
    kept = list(render_all(read_trajectories(path), r, skip_invalid=True, stats=stats))
    assert [x.id for x in kept] == ["ok", "ok"] and stats.skipped == 1 and ":2:" in stats.errors[0]


def test_cli_render_refusal_is_one_line_and_leaves_no_file(tmp_path: Path, capsys) -> None:
    from klong_megatron.cli.data import main

    bad = {"id": "two-calls", "messages": [m.to_json() for m in conversation(parallel=True)], "tools": TOOLS}
    good = {"id": "ok", "messages": [m.to_json() for m in conversation(parallel=False)], "tools": TOOLS}
    path, out = _jsonl(tmp_path, [good, bad]), tmp_path / "out.jsonl"
    argv = ["render", "--input", str(path), "--out", str(out), "--tokenizer", str(REAL / "llama3.1")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and not out.exists() and not list(tmp_path.glob(".out.jsonl*"))
    assert len(err.splitlines()) == 1 and f"{path}:2: trajectory 'two-calls': message 4" in err
    with pytest.raises(SystemExit) as e:
        main([*argv, "--skip-invalid"])
    assert e.value.code == 0 and len(out.read_text().splitlines()) == 1
    assert "skipped 1 invalid" in capsys.readouterr().err

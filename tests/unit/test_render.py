"""Rendering: per-message token spans, assistant masks, and incremental rendering (agent loop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from qwen_style import build_qwen_style_tokenizer

from klong_megatron.data.render import Renderer, load_tokenizer
from klong_megatron.data.trajectory import Message, ToolCall


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    return Renderer(load_tokenizer(str(build_qwen_style_tokenizer(tmp_path_factory.mktemp("qwen")))))


@pytest.fixture(scope="module")
def byte() -> Renderer:
    return Renderer(load_tokenizer("byte"))


def _call(name: str, args: dict, cid: str) -> ToolCall:
    return ToolCall(name, json.dumps(args), cid)


def conversation(turns: int = 6, with_system: bool = True) -> list[Message]:
    msgs = [Message("system", "You reproduce papers.")] if with_system else []
    msgs.append(Message("user", "Reproduce the paper: implement model.py and report the loss."))
    for t in range(turns):
        calls = (_call("bash", {"cmd": f"python train.py --step {t}"}, f"c{t}a"),)
        if t % 3 == 1:  # parallel calls -> consecutive tool messages (grouped by the Qwen template)
            calls += (_call("read_file_chunk", {"file": "model.py", "start_line": t}, f"c{t}b"),)
        msgs.append(
            Message(
                "assistant",
                "" if t % 2 else f"Step {t}: let me run it.",
                calls,
                reasoning="Check the loss." if t == 2 else None,
            )
        )
        for c in calls:
            msgs.append(Message("tool", f"loss {2.0 / (t + 1):.3f}\ndone {c.id}", tool_call_id=c.id))
    msgs.append(Message("assistant", "The loss decreased; submitting."))
    return msgs


@pytest.mark.parametrize("which", ["qwen", "byte"])
@pytest.mark.parametrize("with_system", [True, False])
def test_message_slices_concatenate_to_whole_rendering(which: str, with_system: bool, request) -> None:
    r: Renderer = request.getfixturevalue(which)
    msgs = conversation(with_system=with_system)
    rt = r.render(msgs, "t")
    whole = r.encode(r.text(msgs))
    assert np.concatenate([rt.message_ids(i) for i in range(len(msgs))]).tolist() == whole
    assert rt.spans[0, 0] == 0 and rt.spans[-1, 1] == len(whole)
    assert all(rt.spans[i, 1] == rt.spans[i + 1, 0] for i in range(len(msgs) - 1))


@pytest.mark.parametrize("which", ["qwen", "byte"])
def test_assistant_mask_covers_exactly_what_the_model_generates(which: str, request) -> None:
    r: Renderer = request.getfixturevalue(which)
    msgs = conversation()
    rt = r.render(msgs, "t")
    tok = r.tokenizer
    for i, m in enumerate(msgs):
        ids, mask = rt.message_ids(i), rt.assistant_mask[rt.spans[i, 0] : rt.spans[i, 1]]
        if m.role != "assistant":
            assert not mask.any(), f"message {i} ({m.role}) must not be trained"
            continue
        trained = tok.decode(ids[mask == 1])
        assert trained.endswith("<|im_end|>"), "the end-of-turn token is generated"
        assert ids[mask == 1][-1] == r.eot_id
        if m.content:
            assert m.content in trained
        for c in m.tool_calls:
            assert f'"name": "{c.name}"' in trained and "<tool_call>" in trained
        if m.reasoning:
            assert m.reasoning in trained and "<think>" in trained
        header = tok.decode(ids[: int(np.argmax(mask))])
        assert header.startswith("<|im_start|>assistant") and m.content not in header or not m.content
        assert not mask[int(np.nonzero(mask)[0][-1]) + 1 :].any()  # nothing after the eot is trained
        # every trained token is contiguous
        on = np.nonzero(mask)[0]
        assert on[-1] - on[0] + 1 == len(on)


@pytest.mark.parametrize("which", ["qwen", "byte"])
def test_incremental_rendering_matches_whole_rendering(which: str, request) -> None:
    """The agent loop's token stream (prompt, generation header, engine output ids, observations
    rendered as they arrive) equals the tokenization of the finished conversation."""
    r: Renderer = request.getfixturevalue(which)
    msgs = conversation()
    final = r.render(msgs, "t")
    stream = list(r.render(msgs[:2]).input_ids) if msgs[0].role == "system" else []
    i = 2
    while i < len(msgs):
        assert msgs[i].role == "assistant"
        stream += r.generation_prompt(msgs[:i]).tolist()
        ids, mask = final.message_ids(i), final.assistant_mask[final.spans[i, 0] : final.spans[i, 1]]
        generated = r.encode(r.tokenizer.decode(ids[mask == 1]))  # what an engine would return
        stream += generated + r.assistant_suffix().tolist()
        j = i + 1
        while j < len(msgs) and msgs[j].role != "assistant":
            j += 1
        if j > i + 1:
            stream += np.concatenate(r.render_new(msgs[: i + 1], msgs[i + 1 : j])).tolist()
        i = j
    assert stream == final.input_ids.tolist()


def test_render_new_gives_each_grouped_tool_message_its_own_slice(qwen: Renderer) -> None:
    msgs = conversation()
    k = next(i for i in range(len(msgs) - 1) if msgs[i].role == msgs[i + 1].role == "tool")
    parts = qwen.render_new(msgs[:k], msgs[k : k + 2])
    full = qwen.render(msgs)
    assert [p.tolist() for p in parts] == [full.message_ids(k).tolist(), full.message_ids(k + 1).tolist()]
    assert "<|im_start|>user" in qwen.tokenizer.decode(parts[0])
    assert "<|im_end|>" in qwen.tokenizer.decode(parts[1])


def test_unknown_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither 'byte' / 'demo_bpe' nor a local tokenizer directory"):
        load_tokenizer(str(tmp_path / "nope"))

"""Trajectory schema and streaming JSONL IO: valid input round-trips, bad input names file, line, field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klong_megatron.data.trajectory import ReadStats, TrajectoryError, read_trajectories, write_jsonl

GOOD = {
    "id": "t1",
    "messages": [
        {"role": "system", "content": "sys", "pinned": True},
        {"role": "user", "content": [{"type": "text", "text": "do "}, {"type": "text", "text": "it"}], "pinned": True},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "think",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}
            ],
        },
        {"role": "tool", "content": "a\nb", "tool_call_id": "c1"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "bash",
                "description": "Run a command.",
                "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
            },
        }
    ],
    "meta": {"k": 1},
}


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_valid_trajectory_round_trips(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "id": 7})])
    trajs = list(read_trajectories(p))
    assert [t.id for t in trajs] == ["t1", "7"]
    t = trajs[0]
    assert t.messages[1].content == "do it" and t.messages[0].pinned and not t.messages[2].pinned
    assert t.messages[2].reasoning == "think" and t.messages[2].tool_calls[0].name == "bash"
    assert t.messages[2].to_openai()["tool_calls"][0]["function"]["arguments"] == {"cmd": "ls"}
    assert t.tools == GOOD["tools"] and t.source == f"{p}:1" and trajs[1].source == f"{p}:3"
    out = tmp_path / "o.jsonl"
    write_jsonl(out, [x.to_json() for x in trajs])
    again = list(read_trajectories(out))
    assert [x.to_json() for x in again] == [x.to_json() for x in trajs]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("id"), "'id'"),
        (lambda d: d.update(messages=[]), "'messages'"),
        (lambda d: d["messages"][1].update(role="robot"), "messages[1]'.role"),
        (
            lambda d: d["messages"][2]["tool_calls"][0]["function"].pop("name"),
            "messages[2]'.tool_calls[0].function.name",
        ),
        (lambda d: d["messages"][3].update(tool_calls=[{"function": {"name": "x"}}]), "messages[3]'.tool_calls"),
        (lambda d: d["messages"][0].update(pinned="yes"), "messages[0]'.pinned"),
        (lambda d: d["messages"][1].update(content=[{"type": "image"}]), "messages[1]'.content[0]"),
        (lambda d: d.update(meta=[]), "'meta'"),
        (lambda d: d.update(tools={"bash": {}}), "'tools'"),
        (lambda d: d["tools"][0]["function"].pop("name"), "'tools[0].function.name'"),
        (lambda d: d["tools"][0].update(type="retrieval"), "'tools[0]'"),
        (lambda d: d["tools"][0]["function"].update(parameters={"type": "string"}), "'tools[0].function.parameters'"),
    ],
)
def test_malformed_field_is_named_with_file_and_line(tmp_path: Path, mutate, field: str) -> None:
    bad = json.loads(json.dumps(GOOD))
    mutate(bad)
    p = _write(tmp_path, [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(TrajectoryError) as e:
        list(read_trajectories(p))
    assert f"{p}:2:" in str(e.value) and field in str(e.value)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), '{"id": "x", "messages": ['])
    with pytest.raises(TrajectoryError, match=rf"{p}:3: invalid JSON .*column"):
        list(read_trajectories(p))


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), "not json", json.dumps({"id": "x"}), json.dumps({**GOOD, "id": "t2"})])
    stats = ReadStats()
    ids = [t.id for t in read_trajectories(p, skip_invalid=True, stats=stats)]
    assert ids == ["t1", "t2"] and stats.read == 2 and stats.skipped == 2
    assert ":2:" in stats.errors[0] and ":3:" in stats.errors[1]


def test_reading_streams_line_by_line(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(GOOD), "garbage"])
    it = read_trajectories(p)
    assert next(it).id == "t1"  # yielded before the bad line is even read
    with pytest.raises(TrajectoryError):
        next(it)

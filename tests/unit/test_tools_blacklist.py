"""Blacklist matching, the post-hoc monitor, and bounded output capture (pure; no sandbox)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klong_megatron.config.sandbox import ToolsConfig
from klong_megatron.sandbox._common import OutputCapture
from klong_megatron.sandbox.blacklist import Blacklist, normalize, scan_messages
from klong_megatron.sandbox.tools import clip

BL = Blacklist(["https://github.com/openai/paper-repo", "huggingface.co/someone/weights.git"])


@pytest.mark.parametrize(
    "command",
    [
        "git clone https://github.com/openai/paper-repo.git",
        "git clone git@github.com:openai/paper-repo",
        "curl -LO https://github.com/openai/paper-repo/archive/refs/heads/main.zip",
        "wget www.GitHub.com/OpenAI/Paper-Repo",
        "pip install git+https://github.com/openai/paper-repo@v1#egg=pr",
        "git clone https://huggingface.co/someone/weights",
    ],
)
def test_fetch_commands_of_a_blacklisted_resource_match(command: str) -> None:
    assert BL.match(command) is not None


@pytest.mark.parametrize(
    "command",
    ["git clone https://github.com/openai/paper-repo2", "curl https://github.com/openai/other", "ls paper-repo"],
)
def test_other_resources_do_not_match(command: str) -> None:
    assert BL.match(command) is None


def test_normalize_removes_scheme_www_git_suffix_and_user() -> None:
    assert normalize("HTTPS://www.GitHub.com/o/r.git/") == "github.com/o/r"
    assert normalize("git@github.com:o/r.git") == "github.com/o/r"
    assert normalize("http://host:8080/x") == "host:8080/x"


def test_monitor_reports_tool_calls_and_outputs_with_their_position() -> None:
    messages = [
        {"role": "system", "content": "github.com/openai/paper-repo is forbidden"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "bash", "arguments": '{"command": "ls"}'}}]},
        {
            "role": "assistant",
            "tool_calls": [
                {"function": {"name": "python", "arguments": {"code": "fetch('https://github.com/openai/paper-repo')"}}}
            ],
        },
        {"role": "tool", "name": "bash", "content": "Cloning into 'weights'... huggingface.co/someone/weights"},
    ]
    found = scan_messages(messages, BL)
    assert [(v.message_index, v.tool, v.url) for v in found] == [
        (2, "python", "github.com/openai/paper-repo"),
        (3, "bash", "huggingface.co/someone/weights"),
    ]


def test_unreadable_blacklist_file_names_the_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="missing.txt"):
        Blacklist.from_file(tmp_path / "missing.txt")


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(min_value=2, max_value=400))
def test_capture_keeps_exact_head_and_tail(chunks: list[bytes], limit: int) -> None:
    cap = OutputCapture(limit)
    for c in chunks:
        cap.feed(c)
    data = b"".join(chunks)
    assert cap.total == len(data)
    if len(data) <= limit:
        assert not cap.truncated and bytes(cap.head + cap.tail) == data
    else:
        assert cap.truncated and len(cap.head) + len(cap.tail) == limit
        assert data.startswith(bytes(cap.head)) and data.endswith(bytes(cap.tail))


def test_clip_leaves_short_text_alone_and_marks_cuts() -> None:
    assert clip("short", 256) == "short"
    cut = clip("é" * 2000, 300)
    assert "bytes of output omitted" in cut and cut.startswith("é") and cut.endswith("é")


def test_tools_config_names_bad_fields() -> None:
    with pytest.raises(ValueError, match="submit_min_fraction"):
        ToolsConfig(submit_min_fraction=1.5)
    with pytest.raises(ValueError, match="reminder_every"):
        ToolsConfig(reminder_every=-1)


def test_paperbench_none_blacklist_is_empty(tmp_path):
    (tmp_path / "blacklist.txt").write_text("none")  # semantic-self-consistency's real file
    bl = Blacklist.from_file(tmp_path / "blacklist.txt")
    assert not bl and bl.match("echo none of these") is None

"""The agent's tools over a real (bubblewrap) sandbox: observations, refusals and argument errors."""

from __future__ import annotations

import json
import os

import pytest

from klong_megatron.config.sandbox import SandboxConfig, ToolsConfig
from klong_megatron.sandbox.blacklist import Blacklist
from klong_megatron.sandbox.bwrap import BwrapSandbox
from klong_megatron.sandbox.tools import ToolSet

pytestmark = pytest.mark.bwrap


class Clock:
    """Settable monotonic clock, so budget rules are tested without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def sandbox():
    box = BwrapSandbox(SandboxConfig(backend="bwrap", memory_mb=512, pids=64, run_id=f"pytest-{os.getpid()}"))
    box.start()
    yield box
    box.close()


def tools(sandbox, **cfg) -> ToolSet:
    return ToolSet(sandbox, ToolsConfig(**cfg), clock=Clock())


def test_schemas_are_openai_function_tools_for_every_tool(sandbox) -> None:
    schemas = tools(sandbox).schemas()
    names = [s["function"]["name"] for s in schemas]
    assert names == ["bash", "python", "read_file_chunk", "search_file", "write_file", "edit_file", "submit"]
    for s in schemas:
        assert s["type"] == "function" and s["function"]["parameters"]["type"] == "object"
        assert set(s["function"]["parameters"]["required"]) <= set(s["function"]["parameters"]["properties"])
    json.dumps(schemas)  # serialisable for the chat template


def test_bash_observation_has_output_stderr_and_exit_code(sandbox) -> None:
    obs = tools(sandbox).call("bash", json.dumps({"command": "echo hi; echo oops >&2; exit 3"}))
    assert not obs.ok and obs.text == "hi\n[stderr]\noops\n[exit code 3]"
    assert tools(sandbox).call("bash", {"command": "[[ 1 == 1 ]] && echo bash"}).text == "bash\n[exit code 0]"


def test_python_runs_code_in_the_work_dir(sandbox) -> None:
    obs = tools(sandbox).call("python", {"code": "import os\nprint(os.getcwd(), 6 * 7)"})
    assert obs.ok and obs.text.startswith("/workspace 42")


def test_timeout_is_capped_by_the_config_and_reported(sandbox) -> None:
    obs = tools(sandbox, command_timeout_s=1.0).call("bash", {"command": "sleep 30", "timeout": 999})
    assert not obs.ok and "timed out after 1 s" in obs.text


def test_long_output_is_cut_to_head_and_tail_with_a_marker(sandbox) -> None:
    obs = tools(sandbox, max_observation_bytes=1000).call("bash", {"command": "echo START; seq 1 5000; echo END"})
    assert obs.text.startswith("START\n1\n") and obs.text.endswith("END\n[exit code 0]")
    assert "bytes of output omitted" in obs.text and len(obs.text.encode()) < 1100


def test_write_read_chunk_and_search(sandbox) -> None:
    t = tools(sandbox)
    body = "\n".join(f"line {i}" + (" needle" if i in (30, 32, 90) else "") for i in range(1, 121))
    assert t.call("write_file", {"file": "notes/a.txt", "content": body}).ok
    chunk = t.call("read_file_chunk", {"file": "notes/a.txt", "start_line": 100, "max_lines": 50})
    assert chunk.text.splitlines()[0] == "[notes/a.txt: lines 100-120 of 120]"
    assert chunk.text.splitlines()[1].split("\t") == ["   100", "line 100"]
    found = t.call("search_file", {"file": "notes/a.txt", "query": "NEEDLE", "context_lines": 1})
    lines = found.text.splitlines()
    assert lines[0] == "[3 matching lines in notes/a.txt]"
    assert [ln.split("\t")[0].strip() for ln in lines[1:]] == ["29", "30>", "31", "32>", "33", "--", "89", "90>", "91"]


def test_read_file_chunk_refuses_more_than_fifty_lines(sandbox) -> None:
    t = tools(sandbox)
    t.call("write_file", {"file": "b.txt", "content": "x\n" * 10})
    obs = t.call("read_file_chunk", {"file": "b.txt", "max_lines": 51})
    assert not obs.ok and "max_lines must be between 1 and 50" in obs.text


def test_edit_file_replaces_exactly_one_occurrence(sandbox) -> None:
    t = tools(sandbox)
    t.call("write_file", {"file": "c.py", "content": "a = 1\nb = 1\n"})
    assert "occurs 2 times" in t.call("edit_file", {"file": "c.py", "old_str": "= 1", "new_str": "= 2"}).text
    assert "does not occur" in t.call("edit_file", {"file": "c.py", "old_str": "zzz", "new_str": ""}).text
    assert t.call("edit_file", {"file": "c.py", "old_str": "b = 1", "new_str": "b = 2"}).ok
    assert sandbox.read_file("c.py") == b"a = 1\nb = 2\n"


def test_binary_file_content_decodes_safely(sandbox) -> None:
    sandbox.write_file("bin.dat", b"\xff\xfe\x00abc\n\x80")
    obs = tools(sandbox).call("read_file_chunk", {"file": "bin.dat"})
    assert obs.ok and "abc" in obs.text and "\ufffd" in obs.text


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("rm_rf", "{}", "unknown tool 'rm_rf'"),
        ("bash", '{"command": "ls"', "not valid JSON"),
        ("bash", "[1, 2]", "must be a JSON object"),
        ("bash", "{}", "needs argument(s) ['command']"),
        ("bash", '{"command": "ls", "verbose": true}', "has no argument(s) ['verbose']"),
        (
            "read_file_chunk",
            '{"file": "b.txt", "start_line": "ten"}',
            "'start_line' of read_file_chunk must be an integer",
        ),
        ("read_file_chunk", '{"file": "missing.txt"}', "missing.txt"),
        ("edit_file", '{"file": "c.py", "old_str": "", "new_str": "x"}', "old_str must not be empty"),
    ],
)
def test_model_mistakes_become_error_observations(sandbox, name: str, arguments: str, expected: str) -> None:
    obs = tools(sandbox).call(name, arguments)
    assert not obs.ok and obs.text.startswith("Error:") and expected in obs.text


def test_submit_is_refused_before_the_configured_fraction_of_the_budget(sandbox) -> None:
    clock = Clock()
    t = ToolSet(sandbox, ToolsConfig(time_budget_s=3600, submit_min_fraction=0.5), clock=clock)
    clock.now += 600
    early = t.call("submit", {})
    assert not early.ok and not early.submitted and "10m 00s of 1h 00m" in early.text and "30m 00s" in early.text
    clock.now += 1300
    assert t.call("submit", "").submitted


def test_time_reminder_every_k_steps(sandbox) -> None:
    clock = Clock()
    t = ToolSet(sandbox, ToolsConfig(time_budget_s=7200, reminder_every=2), clock=clock)
    clock.now += 3725
    first, second = t.call("bash", {"command": "true"}), t.call("bash", {"command": "true"})
    assert "elapsed]" not in first.text
    assert second.text.endswith("[time: 1h 02m of 2h 00m elapsed]")


def test_blacklisted_fetch_is_refused_recorded_and_not_run(sandbox) -> None:
    t = ToolSet(sandbox, ToolsConfig(), blacklist=Blacklist(["https://github.com/org/paper-code"]), clock=Clock())
    obs = t.call("bash", {"command": "git clone https://github.com/org/paper-code.git && touch cloned"})
    assert not obs.ok and obs.blocked_url == "github.com/org/paper-code" and "blacklisted" in obs.text
    assert t.call(
        "python", {"code": "import urllib.request as u; u.urlopen('http://github.com/org/paper-code')"}
    ).blocked_url
    assert [v.tool for v in t.violations] == ["bash", "python"]
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("cloned")
    assert t.call("bash", {"command": "echo github.com/org/paper-code-fork"}).ok


def test_blacklist_file_from_config_is_loaded(sandbox, tmp_path) -> None:
    path = tmp_path / "blacklist.txt"
    path.write_text("# official code\nhttps://gitlab.com/lab/repo\n\n")
    t = ToolSet(sandbox, ToolsConfig(blacklist_file=str(path)), clock=Clock())
    assert (
        t.call("bash", {"command": "wget gitlab.com/lab/repo/-/archive/main.tar.gz"}).blocked_url
        == "gitlab.com/lab/repo"
    )

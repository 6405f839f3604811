"""Tool-call parsing for Hermes/Qwen JSON and GLM-4.5 formats, including malformed calls."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from klong_megatron.rollout.toolcalls import format_glm45, format_hermes, parse_glm45, parse_hermes


def test_hermes_content_reasoning_and_two_calls() -> None:
    text = (
        "<think>\nlist first\n</think>\nLet me look.\n"
        + format_hermes("bash", {"cmd": "ls -la"})
        + "\n"
        + format_hermes("read_file", {"path": "a.py"})
        + "<|im_end|>"
    )
    t = parse_hermes(text)
    assert t.reasoning == "list first"
    assert t.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in t.calls] == [
        ("bash", {"cmd": "ls -la"}),
        ("read_file", {"path": "a.py"}),
    ]
    assert t.errors == ()


def test_hermes_arguments_given_as_a_json_string_are_accepted() -> None:
    t = parse_hermes('<tool_call>\n{"name": "bash", "arguments": "{\\"cmd\\": \\"pwd\\"}"}\n</tool_call>')
    assert json.loads(t.calls[0].arguments) == {"cmd": "pwd"}


def test_hermes_malformed_calls_become_errors_and_good_ones_survive() -> None:
    text = (
        "<tool_call>\n{not json}\n</tool_call>\n"
        '<tool_call>\n{"arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "bash", "arguments": [1]}\n</tool_call>\n'
        + format_hermes("bash", {"cmd": "ok"})
        + '\n<tool_call>\n{"name": "bash", "argu'
    )
    t = parse_hermes(text)
    assert [c.name for c in t.calls] == ["bash"]
    assert len(t.errors) == 4
    assert "invalid JSON" in " ".join(t.errors)
    assert "'name'" in " ".join(t.errors)
    assert "'arguments' must be an object" in " ".join(t.errors)
    assert "unterminated" in " ".join(t.errors)


def test_plain_text_has_no_calls() -> None:
    t = parse_hermes("All done, the model reaches 91% accuracy.")
    assert t.calls == () and t.errors == () and t.content.startswith("All done")


def test_glm45_calls_with_typed_and_multiline_values() -> None:
    text = "I will run it.\n" + format_glm45("python", {"code": "print(1)\nprint(2)", "timeout": 30, "flags": [1, 2]})
    t = parse_glm45(text)
    assert t.content == "I will run it."
    assert t.calls[0].name == "python"
    assert json.loads(t.calls[0].arguments) == {"code": "print(1)\nprint(2)", "timeout": 30, "flags": [1, 2]}


def test_glm45_without_arguments_and_malformed() -> None:
    assert parse_glm45("<tool_call>submit\n</tool_call>").calls[0].name == "submit"
    t = parse_glm45("<tool_call><arg_key>x</arg_key><arg_value>1</arg_value></tool_call>")
    assert t.calls == () and "no function name" in t.errors[0]
    t = parse_glm45("<tool_call>bash\n<arg_key>cmd</arg_key>\n</tool_call>")
    assert t.calls == () and "unpaired" in t.errors[0]


_names = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)
_args = st.dictionaries(
    st.from_regex(r"[a-z]{1,8}", fullmatch=True),
    st.one_of(st.text(min_size=1).filter(lambda s: "<" not in s), st.integers(), st.booleans()),
    max_size=4,
)


@given(name=_names, args=_args)
def test_hermes_round_trips_any_call(name: str, args: dict) -> None:
    t = parse_hermes(format_hermes(name, args))
    assert t.errors == () and t.calls[0].name == name and json.loads(t.calls[0].arguments) == args


@given(name=_names, args=_args)
def test_glm45_round_trips_calls_whose_strings_are_not_json(name: str, args: dict) -> None:
    def is_json(s: object) -> bool:
        try:
            json.loads(s)  # type: ignore[arg-type]
            return True
        except (json.JSONDecodeError, TypeError):
            return False

    args = {k: v for k, v in args.items() if not (isinstance(v, str) and (is_json(v) or v != v.strip()))}
    t = parse_glm45(format_glm45(name, args))
    assert t.errors == () and t.calls[0].name == name and json.loads(t.calls[0].arguments) == args

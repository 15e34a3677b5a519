"""Qwen3 tool calls pulled out of streamed answer text (tokenizer_service/tool_calls.py).

The parser must give the same result however the text is cut into deltas, and must never lose text:
what is not a well-formed call comes out as answer text.
"""

from __future__ import annotations

import json

import pytest

from tokenizer_service.tool_calls import ToolCallParser, parse_tool_call

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "c"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def run(text: str, cuts: list[int]) -> tuple[str, list]:
    parser, out, calls = ToolCallParser(), [], []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for piece in pieces:
        t, c = parser.push(piece)
        out.append(t)
        calls.extend(c)
    return "".join(out) + parser.finish(), calls


@pytest.mark.parametrize(
    "text, answer, names",
    [
        ("Let me check.\n" + WEATHER, "Let me check.\n", ["get_weather"]),
        (WEATHER + "\n" + TIME, "", ["get_weather", "get_time"]),
        ("no calls here, only <tool text", "no calls here, only <tool text", []),
        (
            '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # not an object: kept as text
            '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
            [],
        ),
        ("<tool_call>\n{not json}\n</tool_call> after", "<tool_call>\n{not json}\n</tool_call> after", []),
        (
            'before <tool_call>\n{"name": "f", "arguments": {}}',
            'before <tool_call>\n{"name": "f", "arguments": {}}',
            [],
        ),
    ],
)
def test_same_result_for_every_cut(text: str, answer: str, names: list[str]) -> None:
    for cut in range(len(text) + 1):  # every single cut point, and the text in one piece
        got_answer, calls = run(text, [cut])
        assert got_answer == answer, cut
        assert [c.name for c in calls] == names, cut
    got_answer, calls = run(text, list(range(1, len(text))))  # one character at a time
    assert got_answer == answer and [c.name for c in calls] == names


def test_arguments_are_json_objects_and_ids_are_unique() -> None:
    _, calls = run(WEATHER + "\n" + TIME, [])
    assert json.loads(calls[0].arguments_json) == {"city": "東京", "unit": "c"}
    assert json.loads(calls[1].arguments_json) == {}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_serialized_arguments_are_accepted() -> None:
    call = parse_tool_call('{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert call is not None and json.loads(call.arguments_json) == {"x": 1}
    assert parse_tool_call('{"arguments": {}}') is None
    assert parse_tool_call('{"name": "", "arguments": {}}') is None

"""Tool-call parsers: hermes and json, whole outputs and arbitrary streamed splits."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.server.tool_output import ToolStream, final_message, tool_finish_reason
from tandem.server.tool_parsers import make_parser, new_call_id, parse_all
from tandem.server.tools import ToolPlan

NAMES = frozenset({"get_weather", "get_time"})
W = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
T = '{"name": "get_time", "arguments": {"tz": "UTC", "n": [1, 2]}}'


def hermes(text: str):
    return parse_all(make_parser("hermes", NAMES), text)


def calls(delta) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in delta.calls]


def test_call_ids_have_the_openai_form():
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


def test_hermes_one_call_no_content():
    d = hermes(f"<tool_call>\n{W}\n</tool_call>")
    assert calls(d) == [("get_weather", {"city": "Rome"})] and d.content == ""


def test_hermes_several_calls_with_content_around():
    d = hermes(f"Let me look.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>{T}</tool_call>\nDone")
    assert calls(d) == [
        ("get_weather", {"city": "Rome"}),
        ("get_time", {"tz": "UTC", "n": [1, 2]}),
    ]
    assert d.content == "Let me look.Done"


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "arguments": {"city": ',  # cut JSON
        '{"name": "rm_rf", "arguments": {}}',  # not an offered function
        '{"name": "get_weather", "arguments": [1]}',  # arguments not an object
        "not json at all",
    ],
)
def test_hermes_malformed_blocks_stay_content(body):
    text = f"Hi <tool_call>{body}</tool_call> there"
    d = hermes(text)
    assert d.calls == [] and d.content == text


def test_hermes_arguments_as_json_text_and_unterminated_call():
    d = hermes('<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}')
    assert calls(d) == [("get_time", {"tz": "CET"})]


def test_no_calls_keeps_the_text_exactly():
    text = "  O Romeo, Romeo!\n  wherefore art thou <tool  \n\n"
    assert hermes(text).content == text
    assert parse_all(make_parser("json", NAMES), text).content == text


def test_json_parser_object_list_and_fallback():
    p = lambda: make_parser("json", NAMES)  # noqa: E731
    assert calls(parse_all(p(), f"  {W}\n")) == [("get_weather", {"city": "Rome"})]
    assert [n for n, _ in calls(parse_all(p(), f"[{W}, {T}]"))] == ["get_weather", "get_time"]
    for text in ['{"city": "Rome"}', f"[{W}, 3]", "[]", f"{W} trailing", "plain text {"]:
        d = parse_all(p(), text)
        assert d.calls == [] and d.content == text


def test_json_parser_keeps_the_complete_calls_of_a_cut_list():
    d = parse_all(make_parser("json", NAMES), f'[{W}, {T}, {{"name": "get_')
    assert [n for n, _ in calls(d)] == ["get_weather", "get_time"]
    assert d.content == '{"name": "get_'
    d = parse_all(make_parser("json", NAMES), f'[{W}, {{"name": "nope", "arguments": {{}}}}, ')
    assert d.calls == [] and d.content.startswith("[")


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'"):
        make_parser("nope", NAMES)


def test_final_message_shapes():
    plan = ToolPlan(parser="hermes", names=NAMES)
    msg, has = final_message(f"<tool_call>{W}</tool_call>", plan)
    assert has and msg["content"] is None and msg["role"] == "assistant"
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    msg, has = final_message("just words", plan)
    assert not has and msg["content"] == "just words" and "tool_calls" not in msg
    msg, has = final_message(f"<tool_call>{W}</tool_call>", ToolPlan())  # tool_choice none
    assert not has and msg["content"].startswith("<tool_call>")
    assert tool_finish_reason("stop", True) == "tool_calls"
    assert tool_finish_reason("length", True) == "length"
    assert tool_finish_reason("stop", False) == "stop"


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


def _stream(parser: str, pieces: list[str]) -> tuple[str, list[dict]]:
    """Content and calls as a client assembles OpenAI stream deltas."""
    stream = ToolStream(ToolPlan(parser=parser, names=NAMES))
    content, out = "", []
    for i, piece in enumerate(pieces):
        delta = stream.delta(piece, final=i == len(pieces) - 1)
        content += delta.get("content", "")
        for chunk in delta.get("tool_calls", []):
            if chunk["index"] == len(out):
                out.append({"name": chunk["function"]["name"], "arguments": ""})
            out[chunk["index"]]["arguments"] += chunk["function"].get("arguments", "")
    return content, out


TEXTS = [
    f"Sure.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>",
    f"<tool_call>{W}</tool_call> and then <tool_call>{{bad</tool_call> end  ",
    "no calls here, just < and <tool_ and <tool_call trailing",
    f"<tool_call>\n{T}",
    f"  [{W}, {T}]  ",
    f"[{W}, {T}, {W[:20]}",
    f"{W}",
    "{ not json",
]


@settings(max_examples=150, deadline=None)
@given(
    text=st.sampled_from(TEXTS),
    parser=st.sampled_from(["hermes", "json"]),
    cuts=st.lists(st.integers(0, 200), max_size=12),
)
def test_streamed_deltas_concatenate_to_the_whole_message(text, parser, cuts):
    whole = parse_all(make_parser(parser, NAMES), text)
    content, streamed = _stream(parser, _split(text, cuts))
    assert content == whole.content
    assert streamed == [{"name": c.name, "arguments": c.arguments} for c in whole.calls]


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet='<>/_toolcaxyz \n{}"', max_size=60), cuts=st.lists(st.integers(0, 60)))
def test_streaming_is_split_invariant_on_noise(text, cuts):
    whole = parse_all(make_parser("hermes", NAMES), text)
    content, streamed = _stream("hermes", _split(text, cuts))
    assert content == whole.content and not streamed
    assert whole.content == text  # nothing parsed as a call: the text, exactly

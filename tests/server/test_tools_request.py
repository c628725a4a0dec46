"""Tools in chat requests: validation (400s naming the field), the plan (render /
parse / force), the built-in chat template with tools and tool messages, and the
forced-call grammars accepting exactly what the parsers read back."""

from __future__ import annotations

import json

import llguidance
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.builtin.train import CHAT_TEMPLATE
from tandem.engine.structured import load_ll_tokenizer, to_grammar
from tandem.server.cli import parse_configs
from tandem.server.config import ServerConfig
from tandem.server.errors import APIError, validation_error
from tandem.server.flags import ConfigError
from tandem.server.protocol import ChatCompletionRequest
from tandem.server.structured_request import StructuredChecker, structured_output
from tandem.server.tokenizer import Tokenizer
from tandem.server.tool_grammar import forced_tool_calls
from tandem.server.tool_parsers import make_parser, parse_all
from tandem.server.tools import plan_tools

PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "get_time"}},
]  # fmt: skip
USER = [{"role": "user", "content": "weather in Rome?"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER} | fields)


def plan(**fields):
    return plan_tools(chat(**fields), "hermes", StructuredChecker())


def test_plans_by_tool_choice():
    auto = plan(tools=TOOLS)
    assert auto.parser == "hermes" and auto.names == {"get_weather", "get_time"}
    assert [t["function"]["name"] for t in auto.rendered] == ["get_weather", "get_time"]
    assert auto.forced == []
    none = plan(tools=TOOLS, tool_choice="none")
    assert none.rendered is None and none.parser is None
    assert plan().parser is None and plan(tool_choice="auto").parser is None
    (param, forced), *_ = plan(tools=TOOLS, tool_choice="required").forced
    assert param == "tool_choice" and forced.kind == "grammar"
    assert '"get_weather"' in forced.spec and '"get_time"' in forced.spec
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (_, forced), *_ = named.forced
    assert '"get_time"' in forced.spec and "get_weather" not in forced.spec
    single = plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert "start: call\n" in single.forced[0][1].spec


def api_error(**fields) -> APIError:
    with pytest.raises(APIError) as exc:
        req = chat(**fields)
        p = plan_tools(req, "hermes", StructuredChecker())
        structured_output(req, StructuredChecker(), p.forced)
    assert exc.value.status == 400
    return exc.value


def fn(name="f", **extra) -> dict:
    return {"type": "function", "function": {"name": name} | extra}


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [fn("has space")]}, "tools.0.function.name", "1 to 64"),
        ({"tools": [fn("f"), fn("f")]}, "tools.1.function.name", "duplicate"),
        ({"tools": [fn(parameters={"type": "array"})]}, "tools.0.function.parameters", "object"),
        (
            {"tools": [fn(parameters={"type": "object", "properties": {"a": {"type": "nope"}}})]},
            "tools.0.function.parameters",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice", "'x'"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "at most one",
        ),
    ],
)  # fmt: skip
def test_bad_tools_are_400_with_param(fields, param, words):
    err = api_error(**fields)
    assert err.param == param and words in err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]}, "messages.0.tool_calls.0.function.arguments"),
    ],
)  # fmt: skip
def test_malformed_tool_fields_are_validation_400s(fields, param):
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    err = validation_error(exc.value)
    assert err.status == 400 and err.param and err.param.startswith(param)


def test_template_file_equals_the_training_constant():
    assert (BUILTIN_TARGET / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_builtin_template_renders_tools_calls_and_results():
    tok = Tokenizer.from_dir(BUILTIN_TARGET)
    req = chat(
        tools=TOOLS,
        messages=USER
        + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
    )  # fmt: skip
    p = plan_tools(req, "hermes", StructuredChecker())
    text = tok.render_chat(
        [m.template_dict() for m in req.messages], template_kwargs={"tools": p.rendered}
    )
    assert text.startswith("<|bos|><|system|>\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text and "<|user|>\nweather in Rome?<|eos|>" in text
    assert (
        '<|assistant|>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|eos|>'
    ) in text
    assert text.endswith("<|user|>\n<tool_response>\nsunny\n</tool_response><|eos|><|assistant|>\n")
    # What the template shows as a call, the hermes parser reads back as that call.
    call_text = text.split("<|assistant|>\n")[1].split("<|eos|>")[0]
    parsed = parse_all(make_parser("hermes", p.names), call_text)
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"] and parsed.content == ""
    without = tok.render_chat([m.template_dict() for m in chat().messages])
    assert without == "<|bos|><|user|>\nweather in Rome?<|eos|><|assistant|>\n"


@pytest.fixture(scope="module")
def ll_tok():
    hf = AutoTokenizer.from_pretrained(BUILTIN_TARGET)
    return hf, load_ll_tokenizer(BUILTIN_TARGET, len(hf), (hf.eos_token_id,))


CALL = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
OTHER = '{"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize(
    ("parser", "parallel", "text", "ok"),
    [
        ("hermes", True, f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{OTHER}\n</tool_call>", True),
        ("hermes", False, f"<tool_call>\n{CALL}\n</tool_call>", True),
        ("hermes", False, f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>", False),
        ("hermes", True, '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Rome"}}', False),
        ("hermes", True, "Sure", False),
        ("json", True, f"[{CALL}, {OTHER}]", True),
        ("json", False, CALL, True),
        ("json", False, f"[{CALL}", False),
    ],
)  # fmt: skip
def test_forced_grammar_accepts_what_the_parser_reads(ll_tok, parser, parallel, text, ok):
    hf, lt = ll_tok
    functions = [("get_weather", PARAMS), ("get_time", None)]
    so = forced_tool_calls(parser, functions, parallel)
    matcher = llguidance.LLMatcher(lt, to_grammar(so), log_level=0)
    ids = hf.encode(text, add_special_tokens=False)
    accepted = matcher.validate_tokens(ids) == len(ids)
    assert accepted == ok
    if ok:
        matcher.consume_tokens(ids)
        assert matcher.is_accepting()
        parsed = parse_all(make_parser(parser, frozenset({"get_weather", "get_time"})), text)
        assert parsed.calls and parsed.content == ""


def test_tool_call_parser_flag():
    assert parse_configs([])[0].tool_call_parser == "hermes"
    assert parse_configs(["--tool-call-parser", "json"])[0].tool_call_parser == "json"
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, json"):
        ServerConfig(tool_call_parser="xml")
    with pytest.raises(ConfigError, match="tool-call-parser"):
        parse_configs(["--tool-call-parser", "xml"])

"""Tool calling through a real server on the built-in model (hermes parser): forced
calls (required, named, one or several) always parse into arguments valid against the
tool's schema; streamed tool-call deltas add up to the non-streamed calls; tool
messages are accepted back; n-gram speculation and free-text neighbours change none
of it."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from openai_schema import assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
VERSE = {
    "type": "object",
    "properties": {
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}
    },
    "required": ["lines"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "write_verse": VERSE}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": s}}
    for n, s in SCHEMAS.items()
]
MESSAGES = [{"role": "user", "content": "What weather in Verona?"}]
MAX_TOKENS = 120
NAMED = {"type": "function", "function": {"name": "write_verse"}}


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer(["--max-num-seqs", "16"]) as srv:
        yield srv


def body(**fields) -> dict:
    base = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "max_tokens": MAX_TOKENS}
    return base | fields


async def post(http: httpx.AsyncClient, **fields) -> dict:
    """The non-streamed choice, schema-checked."""
    r = await http.post("/v1/chat/completions", json=body(**fields))
    assert r.status_code == 200, r.text
    assert_schema(r.json(), "CreateChatCompletionResponse")
    return r.json()["choices"][0]


async def post_stream(http: httpx.AsyncClient, **fields) -> dict:
    """The streamed choice, assembled from its deltas as a client would."""
    msg: dict = {"content": "", "tool_calls": [], "finish_reason": None}
    async with http.stream("POST", "/v1/chat/completions", json=body(stream=True, **fields)) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
        for c in chunk["choices"]:
            msg["content"] += c["delta"].get("content") or ""
            msg["finish_reason"] = c["finish_reason"] or msg["finish_reason"]
            for d in c["delta"].get("tool_calls") or []:
                if d["index"] == len(msg["tool_calls"]):
                    assert d["id"].startswith("call_") and d["type"] == "function"
                    msg["tool_calls"].append({"name": d["function"]["name"], "arguments": ""})
                msg["tool_calls"][d["index"]]["arguments"] += d["function"].get("arguments", "")
    return msg


def calls_of(choice: dict) -> list[dict]:
    return [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in choice["message"].get("tool_calls") or []
    ]


def assert_valid_calls(calls: list[dict], names: set[str]) -> None:
    assert calls, "a forced tool call produced no call"
    for c in calls:
        assert c["name"] in names
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


async def forced_cases(http: httpx.AsyncClient, num_sampled: int) -> None:
    """Forced calls, greedy (streamed == non-streamed) and `num_sampled` seeds, with
    free-text requests in the same batches."""
    cases = [
        ({"tool_choice": "required", "parallel_tool_calls": False}, set(SCHEMAS)),
        ({"tool_choice": NAMED, "parallel_tool_calls": False}, {"write_verse"}),
        ({"tool_choice": "required"}, set(SCHEMAS)),
        ({"tool_choice": NAMED}, {"write_verse"}),
    ]
    jobs = []
    for fields, _ in cases:
        greedy = fields | {"temperature": 0.0}
        jobs += [post(http, **greedy), post_stream(http, **greedy)]
        jobs += [post(http, **fields, seed=s) for s in range(num_sampled)]
    free = [post(http, tools=[], max_tokens=24, seed=s) for s in range(3)]
    results = await asyncio.gather(*jobs, *free)
    per_case = 2 + num_sampled
    for i, (fields, names) in enumerate(cases):
        whole, streamed, *sampled = results[per_case * i : per_case * (i + 1)]
        assert calls_of(whole) == streamed["tool_calls"]
        assert (whole["message"]["content"] or "") == streamed["content"]
        assert whole["finish_reason"] == streamed["finish_reason"]
        for choice in [whole, *sampled]:
            calls = calls_of(choice)
            assert_valid_calls(calls, names)
            if fields.get("parallel_tool_calls") is False:
                assert len(calls) == 1 and choice["message"]["content"] is None
                assert choice["finish_reason"] == "tool_calls"
            else:  # more calls may follow until max_tokens cuts one (left as content)
                assert choice["finish_reason"] in ("tool_calls", "length")
    for choice in results[per_case * len(cases) :]:
        assert choice["finish_reason"] in ("stop", "length") and not calls_of(choice)


def test_forced_calls_parse_and_stream(server):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            await forced_cases(http, num_sampled=2)

    asyncio.run(run())


def test_auto_and_none(server):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            auto, auto_stream, none = await asyncio.gather(
                post(http, temperature=0.0, max_tokens=32),
                post_stream(http, temperature=0.0, max_tokens=32),
                post(http, tool_choice="none", max_tokens=8, seed=0),
            )
        assert calls_of(auto) == auto_stream["tool_calls"]
        assert (auto["message"]["content"] or "") == auto_stream["content"]
        assert auto["finish_reason"] == auto_stream["finish_reason"]
        if not calls_of(auto):  # the built-in model was never taught to call tools
            assert auto["finish_reason"] in ("stop", "length")
        assert none["finish_reason"] in ("stop", "length") and not calls_of(none)

    asyncio.run(run())


def test_sdk_round_trip_with_tool_messages(server):
    client = server.openai(max_retries=0)
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        seed=3,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert len(call.id) == len("call_") + 24
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    history = MESSAGES + [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
    ]
    again = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, max_tokens=8, seed=0
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}}]}, "tools.0.function.parameters"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400(server, fields, param):
    client = server.openai(max_retries=0)
    args = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS} | fields
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(**args)
    assert exc.value.body["param"] == param and exc.value.body["type"] == "invalid_request_error"


def test_forced_calls_and_schemas_with_ngram_speculation():
    require_builtin_model()
    args = ["--speculative-method", "ngram", "--num-speculative-tokens", "3"]
    with TandemServer(args + ["--speculation-policy", "fixed", "--max-num-seqs", "16"]) as srv:

        async def run() -> None:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as http:
                fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
                schema_jobs = [post(http, tools=[], response_format=fmt, seed=s) for s in range(2)]
                _, *answers = await asyncio.gather(forced_cases(http, 0), *schema_jobs)
            for a in answers:
                assert a["finish_reason"] == "stop"
                jsonschema.validate(json.loads(a["message"]["content"]), WEATHER)

        asyncio.run(run())


def test_tokenize_renders_tools_as_the_chat_route_does(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"messages": MESSAGES, "tools": TOOLS}).json()
        bare = http.post("/tokenize", json={"messages": MESSAGES}).json()
        chat = http.post("/v1/chat/completions", json=body(max_tokens=1)).json()
        assert tokens["count"] == chat["usage"]["prompt_tokens"] > bare["count"]
        r = http.post("/tokenize", json={"prompt": "a", "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"

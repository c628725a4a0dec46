"""Structured output through a real server and the OpenAI SDK on the built-in model:
JSON schemas, json_object, regex, choice and grammar constraints always hold,
streamed and not, batched with free-text requests, with and without speculation."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from openai_schema import assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

MESSAGES = [{"role": "user", "content": "Describe thyself."}]
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"enum": ["merry", "sad", "wroth"]},
            "title": {"type": "string", "maxLength": 8},
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": False,
    },
    "matrix": {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": -9, "maximum": 9},
                    "maxItems": 3,
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["rows"],
        "additionalProperties": False,
    },
    "bounded": {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 10, "maximum": 20},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
        },
        "required": ["ok", "score"],
        "additionalProperties": False,
    },
    "items": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 99},
                "tag": {"enum": ["a", "b"]},
            },
            "required": ["id", "tag"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
}
MAX_TOKENS = 96
REGEX = r"(Ay|Nay), [a-z]{2,6}!"
CHOICES = ["Romeo", "Juliet", "Mercutio"]


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer(["--max-num-seqs", "16"]) as srv:
        yield srv


def response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


async def chat_text(client, stream: bool, **fields) -> tuple[str, str]:
    """(content, finish_reason) of one chat answer, streamed or not."""
    args = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS} | fields
    if not stream:
        r = await client.chat.completions.create(**args)
        assert_schema(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    async for chunk in await client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish


async def mixed_batch(client, seeds: range, spec_fields: dict) -> None:
    """Every schema, streamed and not, at several seeds, plus json_object, regex,
    choice and free-text requests, all in flight together."""
    jobs, checks = [], []
    for name in SCHEMAS:
        for seed in seeds:
            for stream in (False, True):
                fields = {"response_format": response_format(name), "seed": seed} | spec_fields
                jobs.append(chat_text(client, stream, **fields))
                checks.append(("schema", name))
    for seed in seeds:
        jobs.append(
            chat_text(client, seed % 2 == 0, response_format={"type": "json_object"}, seed=seed)
        )
        checks.append(("object", None))
        jobs.append(chat_text(client, seed % 2 == 1, extra_body={"guided_regex": REGEX}, seed=seed))
        checks.append(("regex", None))
        jobs.append(
            chat_text(
                client, False, extra_body={"structured_outputs": {"choice": CHOICES}}, seed=seed
            )
        )
        checks.append(("choice", None))
        jobs.append(chat_text(client, seed % 2 == 0, max_tokens=24, seed=seed))  # free text
        checks.append(("free", None))
    results = await asyncio.gather(*jobs)
    for (kind, name), (text, finish) in zip(checks, results, strict=True):
        if kind == "free":
            assert finish in ("stop", "length") and isinstance(text, str)
            continue
        if kind == "object" and finish == "length":
            # Any JSON object has no length bound (keys and strings are free): a cut
            # answer is a prefix of one.
            assert text.startswith("{")
            continue
        assert finish == "stop", (kind, name, text)
        if kind == "schema":
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        elif kind == "object":
            assert isinstance(json.loads(text), dict)
        elif kind == "regex":
            assert re.fullmatch(REGEX, text), text
        else:
            assert text in CHOICES


def test_constraints_hold_in_a_mixed_batch(server):
    client = server.async_openai(max_retries=0)
    asyncio.run(mixed_batch(client, range(3), {}))


def test_constraints_hold_with_draft_model_speculation():
    """(n-gram speculation: tests/e2e/test_tools_openai.py, one server start per file.)"""
    require_builtin_model()
    args = ["--speculative-method", "draft", "--num-speculative-tokens", "3"]
    with TandemServer(args + ["--speculation-policy", "fixed", "--max-num-seqs", "16"]) as srv:
        client = srv.async_openai(max_retries=0)
        asyncio.run(mixed_batch(client, range(1), {"temperature": 0.0}))
        # Greedy: the same constrained answer with speculation on or off for the request.
        plain = srv.openai(max_retries=0)
        fields = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS}
        fields |= {"temperature": 0.0, "response_format": response_format("person")}
        spec = plain.chat.completions.create(**fields).choices[0].message.content
        off = plain.chat.completions.create(**fields, extra_body={"speculation": {"mode": "off"}})
        assert spec == off.choices[0].message.content


def test_completions_and_grammar(server):
    client = server.openai(max_retries=0)
    for seed in range(2):
        r = client.completions.create(
            model=MODEL_NAME,
            prompt="ROMEO:",
            max_tokens=MAX_TOKENS,
            seed=seed,
            extra_body={"guided_json": SCHEMAS["person"]},
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["person"])
        grammar = 'start: "Thou art " ADJ "."\nADJ: "fair" | "foul" | /[a-z]{3,5}ish/'
        r = client.completions.create(
            model=MODEL_NAME,
            prompt="ROMEO:",
            max_tokens=32,
            seed=seed,
            extra_body={"structured_outputs": {"grammar": grammar}},
        )
        assert re.fullmatch(r"Thou art (fair|foul|[a-z]{3,5}ish)\.", r.choices[0].text)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nosuch"}}}}}}, "response_format.json_schema.schema"),
        ({"extra_body": {"guided_regex": "(open"}}, "guided_regex"),
        ({"extra_body": {"structured_outputs": {"grammar": "start: missing_rule"}}}, "structured_outputs.grammar"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}}, "guided_choice"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400(server, fields, param):
    client = server.openai(max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **fields)
    err = exc.value.body
    assert exc.value.status_code == 400 and err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"

"""Structured-output request fields -> StructuredOutput: each form, conflicts, bad
constraints as 400s naming the field, the compile cache."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tandem.engine.plan import StructuredOutput
from tandem.server.errors import APIError, validation_error
from tandem.server.protocol import ChatCompletionRequest, CompletionRequest
from tandem.server.structured_request import StructuredChecker, structured_output

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}]} | fields
    )


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x"} | fields)


def so_of(req) -> StructuredOutput | None:
    return structured_output(req, StructuredChecker())


@pytest.mark.parametrize("make", [chat, completion])
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object", "")),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
            StructuredOutput("json_schema", json.dumps(SCHEMA)),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "no_schema"}}},
            StructuredOutput("json_object", ""),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json_schema", json.dumps(SCHEMA))),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput("json_schema", json.dumps(SCHEMA))),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, StructuredOutput("regex", "[0-9]{3}")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput("choice", '["yes", "no"]')),
        ({"structured_outputs": {"grammar": 'start: "a"+'}}, StructuredOutput("grammar", 'start: "a"+')),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput("json_object", "")),
        ({"guided_json": SCHEMA}, StructuredOutput("json_schema", json.dumps(SCHEMA))),
        ({"guided_regex": "a|b"}, StructuredOutput("regex", "a|b")),
        ({"guided_choice": ["x"]}, StructuredOutput("choice", '["x"]')),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutput("grammar", 'root ::= "a"')),
    ],
)  # fmt: skip
def test_each_form_maps_to_one_constraint(make, fields, expected):
    assert so_of(make(**fields)) == expected


def bad(req) -> APIError:
    with pytest.raises(APIError) as exc:
        so_of(req)
    assert exc.value.status == 400
    return exc.value


def test_several_constraints_are_a_400_naming_them():
    err = bad(chat(response_format={"type": "json_object"}, guided_regex="a"))
    assert err.param == "guided_regex"
    assert "response_format" in err.message and "guided_regex" in err.message
    err = bad(completion(structured_outputs={"regex": "a", "choice": ["b"]}))
    assert "structured_outputs.regex" in err.message and "structured_outputs.choice" in err.message


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "at least one"),
        ({"structured_outputs": {"grammar": "start: nothere"}}, "structured_outputs.grammar", "nothere"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}}, "guided_json", "nosuchtype"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
            "json_schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_with_param(fields, param, words):
    err = bad(chat(**fields))
    assert err.param == param and words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format.json_schema.name"),
        ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
        ({"guided_choice": "yes"}, "guided_choice"),
    ],
)  # fmt: skip
def test_malformed_fields_are_validation_400s(fields, param):
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    err = validation_error(exc.value)
    assert err.status == 400 and err.param == param


def test_each_distinct_constraint_compiles_once():
    checker = StructuredChecker(max_entries=2)
    for _ in range(3):
        structured_output(chat(guided_regex="[a-z]+"), checker)
        with pytest.raises(APIError):
            structured_output(chat(guided_regex="(bad"), checker)
    assert checker.num_compiled == 2
    structured_output(chat(guided_regex="x"), checker)  # evicts the oldest
    structured_output(chat(guided_regex="[a-z]+"), checker)
    assert checker.num_compiled == 4

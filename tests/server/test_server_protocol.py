"""Request schemas: prompt forms, unsupported fields (400), validation errors as
OpenAI error bodies naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tandem.server.errors import APIError, validation_error
from tandem.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_logit_bias,
    unsupported_fields,
)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x"} | fields)


def test_prompt_forms():
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2]).prompts() == [[1, 2]]
    assert completion(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(APIError, match="must not be empty"):
        completion(prompt=[]).prompts()


def test_token_ids_must_be_ints():
    with pytest.raises(ValidationError):
        completion(prompt=[1.5, 2])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"best_of": 2}, "best_of"),
        ({"suffix": "s"}, "suffix"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_unsupported_fields_are_refused(fields, param):
    req = completion(**fields)
    with pytest.raises(APIError) as exc:
        unsupported_fields(req)
    assert exc.value.status == 400 and exc.value.param == param
    assert "not supported" in exc.value.message


def test_harmless_values_of_unsupported_fields_pass():
    unsupported_fields(completion(best_of=1, tools=[], tool_choice="none"))
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}}
    )
    unsupported_fields(chat)


def test_validation_error_names_the_field():
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate({"messages": [{"role": "robot", "content": "x"}]})
    err = validation_error(exc.value)
    assert err.status == 400 and err.param == "messages.0.role"
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    with pytest.raises(ValidationError) as exc:
        CompletionRequest.model_validate_json(b"{oops")
    assert "not valid JSON" in validation_error(exc.value).message


def test_logit_bias_parsing():
    assert parse_logit_bias({"5": 1.5}, 10) == {5: 1.5}
    for bad in ({"x": 1}, {"10": 1}, {"-1": 1}):
        with pytest.raises(APIError):
            parse_logit_bias(bad, 10)


def test_chat_output_limit_prefers_max_completion_tokens():
    msgs = [{"role": "user", "content": "x"}]
    req = ChatCompletionRequest.model_validate(
        {"messages": msgs, "max_tokens": 3, "max_completion_tokens": 7}
    )
    assert req.output_limit() == 7
    assert ChatCompletionRequest.model_validate({"messages": msgs}).output_limit() is None

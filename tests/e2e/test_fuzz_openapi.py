"""Schemathesis against the OFFICIAL OpenAI description (../shared/data/openai-openapi.yaml),
not Tandem's own schema: completions, chat completions and models.

Every generated call (valid and invalid bodies) must get no 5xx; a 2xx body (or every
SSE chunk of a streamed one) must match OpenAI's response schema; any other status must
carry OpenAI's error object (`ErrorResponse`).

The spec is used as published except in a copy: `model` is pinned to the served name
(else every call is a 404), and `n` and the token limits are capped so that one call
costs milliseconds, not seconds. The run is derandomized (a fixed seed), with a bounded
number of examples per operation, so CI sees the same cases every time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, settings
from openai_schema import SPEC, assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

schemathesis = pytest.importorskip("schemathesis")

MAX_EXAMPLES = 50  # per operation: ~1 min for the three on 2 loaded cores
MAX_TOKENS = 8  # cap on max_tokens / max_completion_tokens in the spec copy
MAX_N = 3  # cap on n
MAX_MODEL_LEN = 96  # bounds calls that leave the token limits out
VOCAB_SIZE = 4096  # the built-in model's
OK_SCHEMAS = {  # operation path -> (body schema, SSE chunk schema)
    "/completions": ("CreateCompletionResponse", "CreateCompletionResponse"),
    "/chat/completions": ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    "/models": ("ListModelsResponse", None),
}


def _pinned_spec() -> dict[str, Any]:
    spec = yaml.safe_load(SPEC.read_text())
    schemas = spec["components"]["schemas"]
    completion = schemas["CreateCompletionRequest"]["properties"]
    chat = schemas["CreateChatCompletionRequest"]["allOf"][1]["properties"]
    # Token-id prompts within the vocabulary (else almost every one is out of it), and no
    # `suffix` (Tandem refuses it by design, a 400 already covered by negative cases).
    for variant in completion["prompt"]["oneOf"][2:]:
        ids = variant["items"].get("items", variant["items"])
        ids |= {"minimum": 0, "maximum": VOCAB_SIZE - 1}
    del completion["suffix"]
    for props in (completion, chat):
        props["model"] = {"type": "string", "enum": [MODEL_NAME]}
        props["n"] |= {"maximum": MAX_N}
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                props[name] |= {"minimum": 0, "maximum": MAX_TOKENS}
    return spec


def _config():
    from schemathesis.config import SchemathesisConfig

    return SchemathesisConfig.from_dict(
        {
            "generation": {
                "mode": "all",  # valid and invalid bodies
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
            },
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        }
    )


schema = (
    schemathesis.openapi.from_dict(_pinned_spec(), config=_config())
    if SPEC.exists()
    else schemathesis.openapi.from_dict(
        {"openapi": "3.1.0", "info": {"title": "missing", "version": "0"}, "paths": {}}
    )
)


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"]
    with TandemServer(args) as srv:
        yield srv


OUTCOMES: dict[str, set[int]] = {path: set() for path in OK_SCHEMAS}  # path -> statuses


def check_response(path: str, response: Any) -> None:
    """No 5xx; 2xx matches OpenAI's response schema; anything else is an OpenAI error."""
    status = response.status_code
    OUTCOMES[path].add(status)
    assert status < 500, f"{status} on {path}: {response.text[:500]}"
    if status >= 300:
        assert_schema(response.json(), "ErrorResponse")
        return
    body_schema, chunk_schema = OK_SCHEMAS[path]
    content_type = response.headers.get("content-type", [""])  # schemathesis: name -> values
    if content_type[0].startswith("text/event-stream"):
        assert chunk_schema is not None, f"{path} streamed"
        chunks = _sse_data(response.text)
        assert chunks and chunks[-1] == "[DONE]", response.text[-300:]
        for data in chunks[:-1]:
            event = json.loads(data)
            if "error" in event:  # an error after the stream began: OpenAI's shape
                assert_schema(event, "ErrorResponse")
            else:
                assert_schema(event, chunk_schema)
        return
    assert_schema(response.json(), body_schema)


def _sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_openai_spec_fuzz(case, server):
    response = case.call(base_url=server.base_url + "/v1", timeout=60)
    check_response(case.operation.path, response)


def test_fuzz_reached_success_and_errors():
    """The fuzz run above exercised both sides: 200s (streamed or not) and 4xx errors on
    the generating operations, so its checks cannot pass vacuously."""
    for path in ("/completions", "/chat/completions"):
        assert 200 in OUTCOMES[path], OUTCOMES
        assert any(400 <= s < 500 for s in OUTCOMES[path]), OUTCOMES
    assert OUTCOMES["/models"] == {200}

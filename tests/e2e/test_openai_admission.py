"""API key, CORS, --chat-template with chat_template_kwargs, and 429 on a full queue."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

from tandem.engine.builtin import BUILTIN_TARGET

KEY = "sk-test-123"
ORIGIN = "http://app.example"
MAX_QUEUED = 2
PROTECTED = [
    ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "A", "max_tokens": 1}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "A"}], "max_tokens": 1},
    ),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "A"}),
    ("POST", "/detokenize", {"tokens": [5]}),
    ("GET", "/version", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_builtin_model()
    template = (BUILTIN_TARGET / "chat_template.jinja").read_text()
    template += "{% if persona is defined %}{{ persona }}{% endif %}"
    path = tmp_path_factory.mktemp("tpl") / "persona.jinja"
    path.write_text(template)
    args = ["--api-key", KEY, "--allowed-origins", ORIGIN, "--chat-template", str(path)]
    args += ["--max-queued-requests", str(MAX_QUEUED), "--max-num-seqs", "1"]
    with TandemServer(args) as srv:
        yield srv


def call(server, method, path, body, headers):
    return httpx.request(method, server.base_url + path, json=body, headers=headers, timeout=30)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_protected_route_needs_the_key(server, method, path, body):
    assert call(server, method, path, body, {}).status_code == 401
    wrong = call(server, method, path, body, {"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert call(server, method, path, body, {"Authorization": KEY}).status_code == 401
    assert call(server, method, path, body, server.headers()).status_code == 200


def test_health_and_metrics_are_public(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_sdk_with_wrong_key_gets_authentication_error(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in server.openai().models.list()] == [MODEL_NAME]


def test_cors(server):
    preflight = httpx.options(
        server.base_url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        server.base_url + "/v1/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(server.base_url + "/v1/models", headers=server.headers() | {"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_chat_template_flag_and_kwargs(server):
    messages = [{"role": "user", "content": "Hi"}]
    with server.http() as http:
        plain = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        persona = http.post(
            "/tokenize",
            json={"messages": messages, "chat_template_kwargs": {"persona": "HAMLET:"}},
        ).json()["tokens"]
        text = http.post("/detokenize", json={"tokens": persona}).json()["prompt"]
        assert text.endswith("<|assistant|>\nHAMLET:") and persona[: len(plain)] == plain
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL_NAME,
                "messages": messages,
                "max_tokens": 2,
                "chat_template_kwargs": {"persona": "HAMLET:"},
            },
        )
        assert r.json()["usage"]["prompt_tokens"] == len(persona)


def test_burst_beyond_the_queue_gets_429_and_admitted_requests_complete(server):
    async def one(client, i):
        try:
            return await client.completions.create(
                model=MODEL_NAME,
                prompt="ROMEO:",
                max_tokens=24,
                seed=i,
                extra_body={"ignore_eos": True},
            )
        except openai.RateLimitError as exc:
            return exc

    async def burst():
        client = server.async_openai(max_retries=0)
        results = await asyncio.gather(*(one(client, i) for i in range(12)))
        await client.close()
        return results

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    done = [r for r in results if not isinstance(r, Exception)]
    assert refused and done and len(refused) + len(done) == 12
    assert len(done) >= MAX_QUEUED  # at least a full queue got in
    for exc in refused:
        assert exc.status_code == 429
        assert int(exc.response.headers["retry-after"]) >= 1
        assert exc.body["code"] == "rate_limit_exceeded"
    for r in done:
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24

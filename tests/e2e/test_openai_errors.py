"""Errors (status + OpenAI error body), the utility routes, and client disconnects."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from openai_schema import assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

BODY_LIMIT = 65536
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 4}


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer(["--max-request-body-bytes", str(BODY_LIMIT)]) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert_schema(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": "two"}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"stop": ""}, "stop"),
        ({"stop_token_ids": [99999999]}, "stop_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"prompt": [[5], []]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [99999999]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"prompt": "the " * 1100}, "prompt"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ],
)
def test_completion_invalid_fields_are_400(http, fields, param):
    err = assert_error(http.post("/v1/completions", json=COMPLETION | fields), 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"add_generation_prompt": True, "continue_final_message": True}, "messages"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"max_completion_tokens": 2000}, "max_tokens"),
    ],
)
def test_chat_invalid_fields_are_400(http, fields, param):
    assert_error(http.post("/v1/chat/completions", json=CHAT | fields), 400, param)


def test_unsupported_fields_never_ignored_by_the_sdk(server):
    client = server.openai(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model=MODEL_NAME, prompt="x", best_of=3, max_tokens=1)


def test_harmless_unknown_fields_are_accepted(http):
    r = http.post("/v1/chat/completions", json=CHAT | {"store": False, "metadata": {"a": "b"}})
    assert r.status_code == 200


def test_malformed_bodies_are_400(http):
    url = "/v1/completions"
    json_type = {"content-type": "application/json"}
    assert_error(http.post(url, content=b"{not json", headers=json_type), 400)
    assert_error(http.post(url, content=b"[1, 2]", headers=json_type), 400)
    assert_error(http.post(url, content=b"", headers=json_type), 400)
    bad_utf8 = b'{"model": "tandem-shakespeare", "prompt": "\xff\xfe", "max_tokens": 1}'
    assert_error(http.post(url, content=bad_utf8, headers=json_type), 400)
    assert_error(http.post("/tokenize", json={"prompt": "a", "bogus": 1}), 400, "bogus")


def test_huge_body_is_413(http):
    big = {"model": MODEL_NAME, "prompt": "a" * (BODY_LIMIT + 10)}
    assert_error(http.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit applies as the body streams in
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b" " * 1000

    assert_error(http.post("/v1/completions", content=chunks()), 413)


def test_unknown_model_is_404(http, server):
    err = assert_error(http.post("/v1/completions", json=COMPLETION | {"model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.openai(max_retries=0).chat.completions.create(
            model="nope", messages=CHAT["messages"], max_tokens=1
        )


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_models_route(http, server):
    body = http.get("/v1/models").json()
    assert_schema(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == [MODEL_NAME]
    assert [m.id for m in server.openai().models.list()] == [MODEL_NAME]


def test_tokenize_detokenize_round_trip(http):
    text = "O Romeo, Romeo!"
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 1024
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    with_special = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert with_special[-len(r["tokens"]) :] == r["tokens"]
    chat = http.post("/tokenize", json={"messages": CHAT["messages"]}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": chat}).json()["prompt"]
    assert text == "<|bos|><|user|>\nHi<|eos|><|assistant|>\n"
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_version_health_metrics(http):
    assert http.get("/version").json()["version"]
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("tandem:num_requests_running", "tandem:num_requests_waiting"):
        assert f'\n{name}{{model_name="{MODEL_NAME}"}} ' in text
    assert 'route="/v1/completions",status="400"}' in text


def _wait_idle(server: TandemServer, within: float) -> float:
    """Seconds until the running and waiting gauges are 0; fails after `within`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if (
            server.metric("tandem:num_requests_running")
            == 0
            == server.metric("tandem:num_requests_waiting")
        ):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"requests still running {within}s after the client left")


def _wait_running(server: TandemServer) -> None:
    deadline = time.monotonic() + 20
    while server.metric("tandem:num_requests_running") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


LONG = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True}


def test_disconnect_while_streaming_aborts(server):
    body = LONG | {"stream": True}
    with (
        httpx.Client(base_url=server.base_url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("tandem:num_requests_running") == 1
    _wait_idle(server, within=1.0)


def test_disconnect_while_waiting_aborts(server):
    def give_up():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.base_url + "/v1/chat/completions", json=CHAT | LONG, timeout=1.5)

    t = threading.Thread(target=give_up)
    t.start()
    _wait_running(server)
    t.join()
    _wait_idle(server, within=1.0)


def test_health_and_metrics_answer_while_engine_is_busy(server):
    busy = LONG | {"max_tokens": 300, "n": 8}
    t = threading.Thread(
        target=httpx.post,
        args=(server.base_url + "/v1/completions",),
        kwargs={"json": busy, "timeout": 120},
    )
    t.start()
    _wait_running(server)
    worst = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        server.metric("tandem:num_requests_running")
        worst = max(worst, time.monotonic() - t0)
    t.join()
    assert worst < 0.5, worst

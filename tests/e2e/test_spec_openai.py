"""Speculative decoding through a real server: per-request control, usage detail, and
the vLLM-named acceptance counters on /metrics."""

from __future__ import annotations

import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

ARGS = ["--speculative-method", "draft", "--speculation-policy", "fixed"]


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer(ARGS) as srv:
        yield srv


def complete(http, **fields):
    body = {
        "model": MODEL_NAME,
        "prompt": "ROMEO:",
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
    } | fields
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_usage_detail_and_per_request_control(server):
    with server.http() as http:
        on = complete(http, usage_detail=True)
        spec = on["usage"]["speculation"]
        assert spec["draft_tokens"] > 0 and 0 < spec["accepted_tokens"] <= spec["draft_tokens"]
        assert spec["acceptance_rate"] == pytest.approx(
            spec["accepted_tokens"] / spec["draft_tokens"]
        )
        off = complete(http, usage_detail=True, speculation={"mode": "off"})
        assert off["usage"]["speculation"]["draft_tokens"] == 0
        assert off["choices"][0]["text"] == on["choices"][0]["text"]  # greedy: the same
        capped = complete(http, usage_detail=True, speculation={"max_k": 1})
        assert capped["usage"]["speculation"]["draft_tokens"] <= 24
        assert "speculation" not in complete(http)["usage"]  # only when asked
        r = http.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": "x", "speculation": {"max_k": -2}},
        )
        assert r.status_code == 400


def test_vllm_named_counters(server):
    with server.http() as http:
        complete(http)
    assert server.metric("vllm:spec_decode_num_draft_tokens_total") > 0
    accepted = server.metric("vllm:spec_decode_num_accepted_tokens_total")
    assert accepted == server.metric("tandem:spec_decode_num_accepted_tokens_total") > 0

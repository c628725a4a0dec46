"""Overload: a burst at several times capacity against small admission limits.

Capacity is MAX_SEQS running + MAX_QUEUED waiting engine requests. The excess gets 429
with `Retry-After` and OpenAI's error object (before any stream starts); every admitted
request completes in full, `n` > 1 and streams included; the server is idle afterwards
and serves the next request.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

MAX_SEQS = 2
MAX_QUEUED = 4
BURST = 30  # 5x the 6 engine requests that fit
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    args = ["--max-num-seqs", str(MAX_SEQS), "--max-queued-requests", str(MAX_QUEUED)]
    with TandemServer(args) as srv:
        yield srv


def body(i: int) -> tuple[str, dict]:
    """Request i of the burst: completions and chat, streamed or not, n = 1 or 2."""
    fields = {
        "model": MODEL_NAME,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "seed": i,
        "n": 1 + i % 2,
        "stream": i % 3 == 0,
    }
    if i % 4 < 2:
        return "/v1/completions", fields | {"prompt": "ROMEO:"}
    return "/v1/chat/completions", fields | {"messages": [{"role": "user", "content": "Hi"}]}


async def send(client: httpx.AsyncClient, i: int) -> tuple[int, dict, dict]:
    """(status, headers, parsed answer); a stream's answer is {index: [tokens, reason]}."""
    path, fields = body(i)
    async with client.stream("POST", path, json=fields) as r:
        raw = await r.aread()
    if r.status_code != 200 or not fields["stream"]:
        return r.status_code, dict(r.headers), json.loads(raw)
    choices: dict[int, list] = {}
    for line in raw.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        assert "error" not in event, f"admitted stream {i} failed in-band: {event}"
        for c in event["choices"]:
            entry = choices.setdefault(c["index"], [0, None])
            entry[0] += 1 if (c.get("text") or (c.get("delta") or {}).get("content")) else 0
            entry[1] = c.get("finish_reason") or entry[1]
    return 200, dict(r.headers), choices


async def burst(base_url: str) -> list[tuple[int, dict, dict]]:
    limits = httpx.Limits(max_connections=BURST)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(send(client, i) for i in range(BURST)))


def test_burst_excess_gets_429_admitted_complete(server):
    rejected_before = server.metric("tandem:request_rejected_total")
    results = asyncio.run(burst(server.base_url))

    refused = [(i, r) for i, r in enumerate(results) if r[0] == 429]
    admitted = [(i, r) for i, r in enumerate(results) if r[0] == 200]
    assert len(refused) + len(admitted) == BURST, [r[0] for r in results]
    assert len(admitted) >= MAX_SEQS  # the first requests always get in
    assert len(refused) >= BURST - 2 * (MAX_SEQS + MAX_QUEUED)  # well past capacity
    for _, (_, headers, error) in refused:
        assert int(headers["retry-after"]) >= 1
        assert error["error"]["type"] == "rate_limit_error"
        assert error["error"]["code"] == "rate_limit_exceeded"
        assert {"message", "param"} <= error["error"].keys()
    for i, (_, _, answer) in admitted:
        n = body(i)[1]["n"]
        if body(i)[1]["stream"]:
            assert sorted(answer) == list(range(n)), answer
            assert all(reason == "length" for _, reason in answer.values()), answer
        else:
            assert [c["finish_reason"] for c in answer["choices"]] == ["length"] * n
            assert answer["usage"]["completion_tokens"] == n * MAX_TOKENS
    assert server.metric("tandem:request_rejected_total") - rejected_before == len(refused)
    server.wait_idle(timeout=30)
    after = httpx.post(
        server.base_url + "/v1/completions",
        json={"model": MODEL_NAME, "prompt": "A", "max_tokens": 2},
        timeout=30,
    )
    assert after.status_code == 200

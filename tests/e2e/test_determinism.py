"""Determinism: a seeded, sampled request gives the same text and tokens alone and
inside a busy batch (other requests of mixed prompt and output lengths running at the
same time), for completions, chat and `n` > 1 (choice i uses seed + i)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234, "max_tokens": 40}
PROBES = {  # path -> body of the request checked
    "completion": (
        "/v1/completions",
        {"prompt": "ROMEO:\nShall I", "logprobs": 0, "n": 2} | SAMPLED,
    ),
    "chat": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Speak, JULIET."}], "logprobs": True} | SAMPLED,
    ),
}
BUSY = 6  # background requests running while a probe runs
BUSY_TOKENS = 160  # they outlive the probe (40 tokens), so the probe runs batched


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer(["--max-num-seqs", "16"]) as srv:
        yield srv


def answer(body: dict) -> list[tuple[str, list[str]]]:
    """Per choice: (text, tokens)."""
    out = []
    for c in body["choices"]:
        if "text" in c:
            out.append((c["text"], c["logprobs"]["tokens"]))
        else:
            out.append((c["message"]["content"], [t["token"] for t in c["logprobs"]["content"]]))
    return out


async def probe(client: httpx.AsyncClient, name: str) -> list[tuple[str, list[str]]]:
    path, body = PROBES[name]
    r = await client.post(path, json={"model": MODEL_NAME} | body)
    assert r.status_code == 200, r.text
    return answer(r.json())


async def background(client: httpx.AsyncClient, i: int) -> None:
    """Mixed lengths: prompts of 1..~60 tokens, sampled or greedy, some streamed."""
    body = {
        "model": MODEL_NAME,
        "prompt": "To be, or not to be: " * (1 + 4 * i),
        "max_tokens": BUSY_TOKENS - 10 * i,
        "ignore_eos": True,
        "temperature": 0.7 * (i % 2),
        "seed": 99 + i,
        "stream": i % 3 == 0,
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


async def busy_probe(server: TandemServer, client: httpx.AsyncClient, name: str):
    tasks = [asyncio.create_task(background(client, i)) for i in range(BUSY)]
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(server.metric, "tandem:num_requests_running") < BUSY:
        assert time.monotonic() < deadline, "the background requests never all ran"
        await asyncio.sleep(0.02)
    result = await probe(client, name)
    still_busy = sum(not t.done() for t in tasks)
    await asyncio.gather(*tasks)
    return result, still_busy


async def scenario(server: TandemServer, name: str):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        alone = await probe(client, name)
        again = await probe(client, name)
        busy, still_busy = await busy_probe(server, client, name)
    return alone, again, busy, still_busy


@pytest.mark.parametrize("name", sorted(PROBES))
def test_seeded_request_same_alone_and_in_busy_batch(server, name):
    alone, again, busy, still_busy = asyncio.run(scenario(server, name))
    assert still_busy == BUSY  # the probe ran start to end inside the busy batch
    assert alone == again
    assert busy == alone
    if name == "completion":  # the two choices differ: seed + i, not one shared stream
        assert alone[0] != alone[1]

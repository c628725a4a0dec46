"""A seeded mix of OpenAI requests for load tests, and an async runner that checks each
answer: completes with the OpenAI shape, or fails with an OpenAI error, never 5xx.

    outcomes = asyncio.run(run_mix(base_url, make_mix(seed=0, count=100), concurrency=16))

Kinds: completions and chat, streamed or not, with `n`, stop strings, seeds, random
lengths; "cancel" streams closed by the client after the first chunk; "invalid" bodies
that must get a 4xx with OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from typing import Any

import httpx

PROMPTS = ("ROMEO:", "JULIET:\nO", "First Citizen:\nWe are", "KING HENRY:", "To be", "A")
STOPS = (["\n"], ["the", "and"], ["\n\n", ","], ["e"])
INVALID = (  # a body fragment the server must refuse with a 4xx
    {"max_tokens": -1},
    {"temperature": 9.0},
    {"n": 0},
    {"model": "no-such-model"},
    {"top_p": 0},
    {"logprobs": 99},
    {"stop": [""]},
)
CANCEL_MAX_TOKENS = 200  # long enough that the client surely closes mid-stream


@dataclass(slots=True)
class MixRequest:
    """One request of the mix."""

    kind: str  # "completion" | "chat" | "cancel" | "invalid"
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]  # the JSON body, `model` included
    n: int  # choices expected


@dataclass(slots=True)
class Outcome:
    """What one request got."""

    request: MixRequest
    status: int  # HTTP status (200 for every stream that started)
    choices: int = 0  # choices that finished (stop or length)
    completion_tokens: int = 0  # from `usage`, when the answer had it


def make_mix(model: str, seed: int, count: int) -> list[MixRequest]:
    """`count` requests drawn from a fixed seed: the same list every time."""
    rng = random.Random(seed)
    mix = []
    for _ in range(count):
        roll = rng.random()  # 10% cancelled, 10% invalid, the rest half and half
        if roll < 0.2:
            kind = "cancel" if roll < 0.1 else "invalid"
        else:
            kind = rng.choice(("completion", "chat"))
        mix.append(_request(rng, model, kind))
    return mix


def _request(rng: random.Random, model: str, kind: str) -> MixRequest:
    chat = kind == "chat" or (kind != "completion" and rng.random() < 0.5)
    prompt = rng.choice(PROMPTS)
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 16)}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body["n"] = rng.choice((1, 1, 2, 3))
    body["temperature"] = rng.choice((0.0, 0.7, 1.0))
    if rng.random() < 0.5:
        body["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.4:
        body["stop"] = rng.choice(STOPS)
    body["stream"] = rng.random() < 0.5
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if kind == "cancel":
        body |= {"stream": True, "n": 1, "max_tokens": CANCEL_MAX_TOKENS, "ignore_eos": True}
        body.pop("stop", None)
    if kind == "invalid":
        body |= rng.choice(INVALID)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return MixRequest(kind, path, body, body["n"])


async def run_mix(base_url: str, mix: list[MixRequest], concurrency: int) -> list[Outcome]:
    """Send the mix with at most `concurrency` requests in flight; check each answer."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one(req: MixRequest) -> Outcome:
            async with gate:
                return await _send(client, req)

        return await asyncio.gather(*(one(r) for r in mix))


async def _send(client: httpx.AsyncClient, req: MixRequest) -> Outcome:
    if not req.body.get("stream"):
        r = await client.post(req.path, json=req.body)
        return _check_plain(req, r.status_code, r.json())
    async with client.stream("POST", req.path, json=req.body) as r:
        if r.status_code != 200:
            return _check_plain(req, r.status_code, json.loads(await r.aread()))
        if req.kind == "cancel":
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # leaving the block closes the connection mid-stream
            return Outcome(req, 200)
        return _check_stream(req, [line async for line in r.aiter_lines()])


def _check_plain(req: MixRequest, status: int, body: dict[str, Any]) -> Outcome:
    assert status < 500, f"{status} for {req.body}: {body}"
    if status != 200:
        assert req.kind == "invalid", f"{status} for a valid request {req.body}: {body}"
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and {"param", "code"} <= error.keys()
        return Outcome(req, status)
    assert req.kind != "invalid", f"200 for an invalid request {req.body}"
    reasons = [c["finish_reason"] for c in body["choices"]]
    assert len(reasons) == req.n and set(reasons) <= {"stop", "length"}, body
    tokens = body["usage"]["completion_tokens"]
    assert 0 < tokens <= req.n * req.body["max_tokens"], body["usage"]
    return Outcome(req, status, len(reasons), tokens)


def _check_stream(req: MixRequest, lines: list[str]) -> Outcome:
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", lines[-5:]
    finished: dict[int, str] = {}
    tokens = 0
    for event in map(json.loads, data[:-1]):
        assert "error" not in event, event
        for choice in event["choices"]:
            if choice.get("finish_reason"):
                finished[choice["index"]] = choice["finish_reason"]
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    assert sorted(finished) == list(range(req.n)), finished
    assert set(finished.values()) <= {"stop", "length"}, finished
    if req.body.get("stream_options"):
        assert 0 < tokens <= req.n * req.body["max_tokens"]
    return Outcome(req, 200, len(finished), tokens)

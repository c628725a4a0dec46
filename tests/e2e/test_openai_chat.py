"""/v1/chat/completions through a real server, with the OpenAI SDK and httpx."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai_schema import assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

MESSAGES = [{"role": "user", "content": "Who art thou?"}]


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    with TandemServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.openai(max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with server.http() as c:
        yield c


def chat(http, **fields):
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES} | fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_schema(body, "CreateChatCompletionResponse")
    return body


def chat_stream(http, **fields) -> list[dict]:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "stream": True} | fields
    chunks = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        assert_schema(chunk, "CreateChatCompletionStreamResponse")
        chunks.append(chunk)
    return chunks


def contents(chunks: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            out[ch["index"]] = out.get(ch["index"], "") + (ch["delta"].get("content") or "")
    return out


def prompt_ids(http, messages, **fields) -> list[int]:
    r = http.post("/tokenize", json={"messages": messages} | fields)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_sdk_sync(client, http):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(prompt_ids(http, MESSAGES))
    raw = chat(http, max_tokens=8, seed=1)
    assert raw["choices"][0]["message"]["refusal"] is None
    assert raw["choices"][0]["message"]["content"] == msg.content


def test_sdk_streaming_first_chunk_has_role(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=10,
        seed=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    full = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=10, seed=2
    )
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_sdk_async(server):
    async def run():
        client = server.async_openai(max_retries=0)
        r = await client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=6, temperature=0
        )
        await client.close()
        return r

    assert asyncio.run(run()).choices[0].message.content


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"seed": 7, "top_p": 0.8}])
def test_stream_equals_non_stream_with_n(http, fields):
    fields = {"max_tokens": 20, "n": 3, "stop": "\n\n"} | fields
    body = chat(http, **fields)
    chunks = chat_stream(http, **fields)
    assert contents(chunks) == {c["index"]: c["message"]["content"] for c in body["choices"]}
    first = {}
    for c in chunks:
        for ch in c["choices"]:
            first.setdefault(ch["index"], ch["delta"])
    assert all(d == {"role": "assistant", "content": ""} for d in first.values())
    reasons = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in body["choices"]}


def test_n_and_seed(http):
    fields = {"max_tokens": 12, "seed": 99, "temperature": 1.0}
    three = [c["message"]["content"] for c in chat(http, n=3, **fields)["choices"]]
    assert len(set(three)) == 3
    assert chat(http, n=1, **fields)["choices"][0]["message"]["content"] == three[0]
    again = chat(http, n=1, **(fields | {"seed": 100}))["choices"][0]["message"]["content"]
    assert again == three[1]


def test_logprobs_and_top_logprobs(http):
    body = chat(http, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None
    assert len(content) == body["usage"]["completion_tokens"] - (
        body["choices"][0]["finish_reason"] == "stop"
    )
    assert "".join(item["token"] for item in content) == body["choices"][0]["message"]["content"]
    for item in content:
        assert len(item["top_logprobs"]) == 3
        assert item["top_logprobs"][0]["token"] == item["token"]  # greedy
        assert bytes(item["bytes"]).decode() == item["token"]
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"], abs=1e-4)
    plain = chat(http, max_tokens=3, temperature=0, logprobs=True)
    assert all(item["top_logprobs"] == [] for item in plain["choices"][0]["logprobs"]["content"])
    assert chat(http, max_tokens=3)["choices"][0]["logprobs"] is None
    chunks = chat_stream(http, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    streamed = [
        i
        for c in chunks
        for ch in c["choices"]
        if ch["logprobs"]
        for i in ch["logprobs"]["content"]
    ]
    assert streamed == content


def test_generation_prompt_and_continue_final_message(http):
    with_prompt = prompt_ids(http, MESSAGES)
    without = prompt_ids(http, MESSAGES, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    body = chat(http, max_tokens=4, temperature=0, add_generation_prompt=False)
    assert body["usage"]["prompt_tokens"] == len(without)
    partial = MESSAGES + [{"role": "assistant", "content": "I am ROMEO"}]
    cont = prompt_ids(http, partial, add_generation_prompt=False, continue_final_message=True)
    tail = http.post("/tokenize", json={"prompt": "I am ROMEO", "add_special_tokens": False})
    assert cont[-len(tail.json()["tokens"]) :] == tail.json()["tokens"]
    body = chat(
        http,
        messages=partial,
        add_generation_prompt=False,
        continue_final_message=True,
        max_tokens=4,
        temperature=0,
    )
    assert body["usage"]["prompt_tokens"] == len(cont)


def test_text_parts_system_and_developer_roles(http):
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Who art"}, {"type": "text", "text": " thou?"}],
        }
    ]
    assert prompt_ids(http, parts) == prompt_ids(http, MESSAGES)
    system = [{"role": "system", "content": "Speak as a king."}] + MESSAGES
    developer = [{"role": "developer", "content": "Speak as a king."}] + MESSAGES
    assert prompt_ids(http, developer) == prompt_ids(http, system)
    assert chat(http, messages=system, max_tokens=3)["choices"][0]["message"]["content"] is not None


def test_max_completion_tokens_wins(http):
    body = chat(http, max_tokens=3, max_completion_tokens=7, temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 7


def _byte_token_id(http, byte: int) -> int:
    """The id of the byte-level token for one UTF-8 byte (via a character that needs it)."""
    text = {0xC3: "é", 0xA9: "é", 0xE4: "你", 0xBD: "你", 0xA0: "你"}[byte]
    ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()[
        "tokens"
    ]
    position = list(text.encode()).index(byte)
    assert len(ids) == len(text.encode())  # one token per byte
    return ids[position]


@pytest.mark.parametrize(("char", "n"), [("é", 8), ("你", 32)])
def test_multibyte_text_streams_intact(http, char, n):
    """Only the byte tokens of `char` may be sampled: whatever order the model picks,
    streamed text equals the full text (no character split or replaced mid-stream)."""
    byte_ids = [_byte_token_id(http, b) for b in char.encode()]
    fields = {"max_tokens": 6, "n": n, "seed": 0, "logit_bias": {str(i): 100 for i in byte_ids}}
    body = chat(http, **fields)
    texts = {c["index"]: c["message"]["content"] for c in body["choices"]}
    assert any(char in t for t in texts.values())
    assert contents(chat_stream(http, **fields)) == texts
    lp = chat(http, **(fields | {"n": 1, "logprobs": True}))["choices"][0]["logprobs"]["content"]
    assert all(len(item["bytes"]) == 1 and item["bytes"][0] in char.encode() for item in lp)

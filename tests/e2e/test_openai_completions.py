"""/v1/completions through a real server, with the OpenAI SDK and httpx."""

from __future__ import annotations

import asyncio

import pytest
from openai_schema import assert_schema
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

PROMPT = "ROMEO:"


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


def complete(http, **fields):
    r = http.post("/v1/completions", json={"model": MODEL_NAME} | fields)
    assert r.status_code == 200, r.text
    body = r.json()
    if not (fields.get("echo") and fields.get("logprobs") is not None):
        # (echoed prompt logprobs start with null, which the spec's schema omits)
        assert_schema(body, "CreateCompletionResponse")
    return body


def stream(http, **fields) -> tuple[list[dict], list[str]]:
    """(chunks, raw data lines) of a streamed completion, schema-checked."""
    import json

    chunks, lines = [], []
    body = {"model": MODEL_NAME, "stream": True} | fields
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            lines.append(line)
            if line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert_schema(_as_final(chunk), "CreateCompletionResponse")
                chunks.append(chunk)
    assert lines[-1] == "data: [DONE]"
    return chunks, lines


def _as_final(chunk: dict) -> dict:
    """The spec gives streamed chunks the non-streamed shape, yet OpenAI (and its SDK)
    send `finish_reason: null` until a choice ends: check the rest of the shape."""
    choices = [c | {"finish_reason": c["finish_reason"] or "length"} for c in chunk["choices"]]
    return chunk | {"choices": choices}


def streamed_texts(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    return texts


def token_ids(http, text: str) -> list[int]:
    """The ids of `text` alone (no BOS or other special tokens)."""
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    return r.json()["tokens"]


def test_sdk_sync_greedy(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].text, str) and r.choices[0].text
    u = r.usage
    assert u.prompt_tokens >= 1 and 1 <= u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_sdk_async_and_streaming(server):
    async def run():
        client = server.async_openai(max_retries=0)
        full = await client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=10, seed=5, temperature=1.0
        )
        parts = []
        async for chunk in await client.completions.create(
            model=MODEL_NAME, prompt=PROMPT, max_tokens=10, seed=5, temperature=1.0, stream=True
        ):
            parts.append(chunk.choices[0].text if chunk.choices else "")
        await client.close()
        return full, parts

    full, parts = asyncio.run(run())
    assert "".join(parts) == full.choices[0].text


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"seed": 11, "top_k": 20, "top_p": 0.9}])
def test_stream_equals_non_stream(http, fields):
    fields = {"prompt": PROMPT, "max_tokens": 24, "n": 2, "stop": ["\n\n"]} | fields
    body = complete(http, **fields)
    chunks, _ = stream(http, **fields, stream_options={"include_usage": True})
    texts = streamed_texts([c for c in chunks if c["choices"]])
    assert texts == {c["index"]: c["text"] for c in body["choices"]}
    finals = [ch for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(ch["index"] for ch in finals) == [0, 1]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == body["usage"]


def test_no_usage_chunk_without_include_usage(http):
    chunks, _ = stream(http, prompt=PROMPT, max_tokens=4)
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


def test_prompt_forms_one_choice_per_prompt_in_order(http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    ids2 = http.post("/tokenize", json={"prompt": "JULIET:"}).json()["tokens"]
    greedy = {"max_tokens": 6, "temperature": 0}
    by_text = complete(http, prompt=[PROMPT, "JULIET:"], n=2, **greedy)
    assert [c["index"] for c in by_text["choices"]] == [0, 1, 2, 3]
    by_ids = complete(http, prompt=[ids, ids2], n=2, **greedy)
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    single_ids = complete(http, prompt=ids, **greedy)
    assert single_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == len(ids) + len(ids2)


def test_echo_prepends_prompt(http):
    plain = complete(http, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = complete(http, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    chunks, _ = stream(http, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert streamed_texts(chunks)[0] == echoed["choices"][0]["text"]


def test_logprobs_completions_shape(http):
    body = complete(http, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert n == 6
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    for token, value, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert value <= 0 and 1 <= len(top) <= 3
        # greedy: the chosen token is the most likely one
        assert top[token] == pytest.approx(max(top.values()), abs=1e-4)
        assert value == pytest.approx(top[token], abs=1e-4)


def test_echo_logprobs_max_tokens_zero_scores_the_prompt(http):
    """The lm-evaluation-harness scoring call: prompt logprobs only, first is null."""
    text = "ROMEO: What say you?"
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    r = http.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == text
    lp = choice["logprobs"]
    # one entry per prompt token (a BOS the tokenizer adds included)
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]).endswith(text)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert body["usage"]["completion_tokens"] == 0
    # A token's score equals its logprob when the model generates it (greedy here).
    gen = complete(http, prompt=ids, max_tokens=1, temperature=0, logprobs=1, ignore_eos=True)
    token = gen["choices"][0]["logprobs"]["tokens"][0]
    token_id = token_ids(http, token)
    assert len(token_id) == 1
    scored = complete(http, prompt=ids + token_id, max_tokens=0, echo=True, logprobs=1)
    score = scored["choices"][0]["logprobs"]["token_logprobs"][-1]
    assert score == pytest.approx(gen["choices"][0]["logprobs"]["token_logprobs"][0], abs=2e-3)


def test_n_gives_distinct_choices_and_seeds_reproduce(http):
    fields = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    four = complete(http, n=4, **fields)
    texts = [c["text"] for c in four["choices"]]
    assert [c["index"] for c in four["choices"]] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    assert [c["text"] for c in complete(http, n=4, **fields)["choices"]] == texts  # across runs
    for i in range(2):  # across n: choice i is the n=1 request with seed + i
        one = complete(http, n=1, **(fields | {"seed": 1234 + i}))
        assert one["choices"][0]["text"] == texts[i]


def test_stop_strings_across_token_boundaries(http):
    base = complete(http, prompt=PROMPT, max_tokens=30, temperature=0, logprobs=0, ignore_eos=True)
    text = base["choices"][0]["text"]
    lp = base["choices"][0]["logprobs"]
    # A stop string made of the end of one token and the start of the next.
    k = next(
        i
        for i in range(2, len(lp["tokens"]) - 1)
        if len(lp["tokens"][i]) >= 2
        and len(lp["tokens"][i + 1]) >= 2
        and text.find(lp["tokens"][i][-2:] + lp["tokens"][i + 1][:2])
        == lp["text_offset"][i] + len(lp["tokens"][i]) - 2
    )
    stop = lp["tokens"][k][-2:] + lp["tokens"][k + 1][:2]
    cut = text.index(stop)
    fields = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    r = complete(http, stop=[stop, "never-seen-xyz"], **fields)
    assert r["choices"][0]["text"] == text[:cut]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < 30
    kept = complete(http, stop=stop, include_stop_str_in_output=True, **fields)
    assert kept["choices"][0]["text"] == text[: cut + len(stop)]
    chunks, _ = stream(http, stop=stop, **fields)
    assert streamed_texts(chunks)[0] == text[:cut]


def test_stop_token_ids_and_min_tokens(http):
    newline = token_ids(http, "\n")
    assert len(newline) == 1
    fields = {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    base = complete(http, **fields)["choices"][0]["text"]
    assert "\n" in base
    r = complete(http, stop_token_ids=newline, **fields)
    assert r["choices"][0]["text"] == base[: base.index("\n")]
    assert r["choices"][0]["finish_reason"] == "stop"
    late = complete(http, stop_token_ids=newline, min_tokens=8, **fields)
    assert late["usage"]["completion_tokens"] > 8


def test_ignore_eos_runs_to_max_tokens(http):
    r = complete(http, prompt=PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    assert r["usage"]["completion_tokens"] == 20
    assert r["choices"][0]["finish_reason"] == "length"


def test_logit_bias_forces_and_bans_tokens(http):
    the = token_ids(http, " the")
    assert len(the) == 1
    forced = complete(
        http, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(the[0]): 100}
    )
    assert forced["choices"][0]["text"] == " the" * 4
    newline = token_ids(http, "\n")
    banned = complete(
        http,
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        ignore_eos=True,
        logit_bias={str(newline[0]): -100},
    )
    assert "\n" not in banned["choices"][0]["text"]


def test_penalties_and_sampling_fields_are_applied(http):
    fields = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    base = complete(http, **fields)["choices"][0]["text"]
    for extra in (
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
    ):
        assert complete(http, **(fields | extra))["choices"][0]["text"] != base, extra
    sampled = {"prompt": PROMPT, "max_tokens": 8, "seed": 3, "temperature": 1.0, "logprobs": 2}
    for only_top in ({"top_k": 1}, {"min_p": 1.0}):  # only the most likely token survives
        lp = complete(http, **sampled, **only_top)["choices"][0]["logprobs"]
        for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert value == pytest.approx(max(top.values()), abs=1e-6), only_top
    complete(http, **sampled, user="someone")  # accepted


def test_max_tokens_default_is_16(http):
    r = complete(http, prompt=PROMPT, temperature=0, ignore_eos=True)
    assert r["usage"]["completion_tokens"] == 16


def test_n_choices_share_the_prompt_kv(http):
    """The first choice computes a long prompt; the others reuse its KV blocks."""
    prompt = "JULIET: " + "Wherefore art thou, gentle Romeo? " * 12  # several KV blocks
    fields = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 77}
    body = complete(http, n=3, **fields)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    texts = [c["text"] for c in body["choices"]]
    for i in (0, 2):  # same tokens as unshared, separately seeded requests
        one = complete(http, **(fields | {"seed": 77 + i}))
        assert one["choices"][0]["text"] == texts[i]

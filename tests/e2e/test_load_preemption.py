"""Preemption under a small KV pool: several concurrent greedy requests with long
outputs need more blocks than the pool has, so the scheduler preempts (and later
recomputes) some of them. All must complete with exactly the text and tokens each
gets when it runs alone (unpressured), and the preemption counter must have moved.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

# float32, not the built-in bf16: a preempted request is recomputed as one prefill
# chunk, whose KV differs from the decoded one by rounding; bf16 logits come in steps of
# ~0.06 and tie or nearly tie at a few positions of a long greedy output, so one ulp can
# flip the argmax (seen: 1 run in 6 differed at token 146 of 150). float32 rounding is
# ~1e4 times smaller (0 of 8 pressured runs differed).
DTYPE = "float32"
# The model holds 160 KiB of float32 KV per 16-token block (10 layers x K,V x 2 heads x
# 64 dims x 4 bytes): 4 MiB is a pool of 25 blocks (400 tokens). One request (a short
# prompt + OUTPUT_TOKENS) needs BLOCKS_PER_REQUEST (11), so it runs alone without
# pressure, while CONCURRENT of them need almost twice the pool.
KV_MEMORY = "4MiB"
OUTPUT_TOKENS = 150
BLOCKS_PER_REQUEST = (OUTPUT_TOKENS + 10 + 15) // 16  # prompt (<= 10 tokens) + outputs
MAX_MODEL_LEN = 384  # 24 blocks: the server refuses a pool smaller than one sequence
PROMPTS = ("ROMEO:", "JULIET:\nO Romeo", "KING HENRY:\nOnce more", "First Citizen:\nWe")
CONCURRENT = len(PROMPTS)


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    # BASE_ARGS' --kv-cache-memory comes first; the later flag wins.
    args = ["--kv-cache-memory", KV_MEMORY, "--max-num-seqs", str(CONCURRENT)]
    args += ["--max-model-len", str(MAX_MODEL_LEN), "--dtype", DTYPE]  # one seq fits the pool
    with TandemServer(args) as srv:
        yield srv


async def complete(client: httpx.AsyncClient, prompt: str) -> tuple[str, list[str]]:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,  # the tokens, one string each
    }
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    tokens = choice["logprobs"]["tokens"]
    assert len(tokens) == OUTPUT_TOKENS
    return choice["text"], tokens


async def run(base_url: str, together: bool) -> list[tuple[str, list[str]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        if together:
            return list(await asyncio.gather(*(complete(client, p) for p in PROMPTS)))
        return [await complete(client, p) for p in PROMPTS]


def test_preempted_greedy_requests_match_unpressured_runs(server):
    blocks = server.metric("tandem:kv_cache_num_blocks")
    assert BLOCKS_PER_REQUEST <= blocks < BLOCKS_PER_REQUEST * CONCURRENT, blocks
    before = server.metric("tandem:num_preemptions_total")
    alone = asyncio.run(run(server.base_url, together=False))
    assert server.metric("tandem:num_preemptions_total") == before  # alone: no pressure
    together = asyncio.run(run(server.base_url, together=True))
    assert server.metric("tandem:num_preemptions_total") > before  # the pool ran out
    for prompt, a, t in zip(PROMPTS, alone, together, strict=True):
        assert t == a, f"{prompt!r}: the preempted run differs from the run alone"
    server.wait_idle(timeout=30)

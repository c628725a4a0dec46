"""The offline LLM API over the whole stack (scheduler -> worker -> model -> sampler)
with the built-in model, checked against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.builtin import BUILTIN_TARGET
from tandem.engine.plan import SamplingParams
from tandem.server.llm import LLM

pytestmark = pytest.mark.skipif(
    not (BUILTIN_TARGET / "model.safetensors").exists(), reason="built-in model not trained"
)

PROMPTS = [
    "ROMEO:\nWhat light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy "
    "name; or, if thou wilt not, be but sworn my love, and I'll no longer be a Capulet.",
    "First Citizen:\n",
    "KING RICHARD III:\nNow is the winter of our discontent made glorious summer",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_greedy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUILTIN_TARGET)
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_TARGET, dtype=torch.float32)
    outs = []
    for p in PROMPTS:
        ids = tok.encode(p)
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2
        )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="float32", kv_cache_memory=64 << 20)
    yield engine
    engine.shutdown()


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_transformers(llm, hf_greedy):
    assert _ids(llm.generate(PROMPTS, GREEDY)) == hf_greedy


def test_tiny_token_budget_chunks_and_matches(hf_greedy):
    engine = LLM(dtype="float32", kv_cache_memory=64 << 20, max_num_batched_tokens=8)
    try:
        outs = engine.generate(PROMPTS, GREEDY)
        stats = engine.engine.core.stats()
    finally:
        engine.shutdown()
    assert _ids(outs) == hf_greedy
    # The longest prompt alone needs > 4 steps of 8 tokens: chunking happened, and
    # decodes shared steps with prefill chunks (piggybacking).
    steps = stats.steps
    assert steps.num_steps > 24 + 40 // 8
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps.recent)
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in steps.recent) <= 8


def test_prefix_cache_hits_and_same_tokens(llm, hf_greedy):
    first = llm.generate(PROMPTS[1], GREEDY)[0]
    again = llm.generate(PROMPTS[1], GREEDY)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == hf_greedy[1]
    n_prompt = len(again.prompt_token_ids)
    block = llm.engine.kv.block_size
    # Every full block of the prompt hits, except that the last prompt token is always
    # computed (it yields the first output's logits).
    assert again.num_cached_tokens == ((n_prompt - 1) // block) * block


def test_preemption_under_tiny_pool_keeps_outputs(hf_greedy):
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=24)
    roomy = LLM(dtype="float32", kv_cache_memory=64 << 20)
    try:
        ref_sampled = roomy.generate(PROMPTS, sampled)
    finally:
        roomy.shutdown()
    # 12 blocks of 16 tokens: four sequences of ~40-60 tokens cannot all fit at once.
    tight = LLM(
        dtype="float32", block_size=16, kv_cache_memory=_bytes_for_blocks(12), max_model_len=160
    )
    try:
        outs = tight.generate(PROMPTS, GREEDY)
        outs_sampled = tight.generate(PROMPTS, sampled)
        sched = tight.engine.core.scheduler
        assert sched.stats().num_preemptions > 0
        assert sched.pool.num_free_blocks == tight.engine.kv.num_blocks
    finally:
        tight.shutdown()
    assert _ids(outs) == hf_greedy
    assert _ids(outs_sampled) == _ids(ref_sampled)


def _bytes_for_blocks(n: int) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(BUILTIN_TARGET)
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 16 * 4
    return n * per_block


def test_seeded_sampling_is_batch_independent(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    alone = llm.generate(PROMPTS[0], sp)[0].outputs[0].token_ids
    crowd = llm.generate(PROMPTS, [sp, GREEDY, GREEDY, GREEDY])[0].outputs[0].token_ids
    assert alone == crowd


def test_n_choices_and_stop_strings(llm):
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=24)
    out = llm.generate("ROMEO:\n", sp, n=3)[0]
    texts = [c.text for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len(set(texts)) == 3
    stopped = llm.generate("ROMEO:\n", GREEDY, stop=["\n"])[0].outputs[0]
    full = llm.generate("ROMEO:\n", GREEDY)[0].outputs[0]
    assert stopped.finish_reason == "stop" and "\n" not in stopped.text
    assert full.text.startswith(stopped.text + "\n")


def test_prompt_logprobs_match_transformers(llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BUILTIN_TARGET, dtype=torch.float32)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    out = llm.generate(PROMPTS[1], sp)[0]
    ids = out.prompt_token_ids
    ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None
    got = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    top = out.prompt_logprobs[5].top
    assert [t for t, _ in top] == ref[4].topk(3).indices.tolist()

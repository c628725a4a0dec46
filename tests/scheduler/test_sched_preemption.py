"""Preemption by recompute under a tiny KV pool: nothing lost, same outputs, no leaks."""

from __future__ import annotations

import pytest
from scheduler_fakes import FakeExecutor, greedy, make_core, reference_tokens, run_to_end, tokens_of

from tandem.engine.plan import SamplingParams
from tandem.scheduler.request import GenerateRequest


def prompts() -> list[list[int]]:
    return [[(i * 11 + j * 3) % 45 + 1 for j in range(6 + 3 * i)] for i in range(6)]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("budget", [32, 5])
def test_tiny_pool_preempts_and_every_request_completes_unchanged(prefix_caching, budget):
    ex = FakeExecutor(num_blocks=12, block_size=4)
    core, _ = make_core(ex, enable_prefix_caching=prefix_caching, max_num_batched_tokens=budget)
    reqs = [GenerateRequest(f"r{i}", p, greedy(max_tokens=20)) for i, p in enumerate(prompts())]
    outs = run_to_end(core, reqs)
    stats = core.stats().scheduler
    assert stats.num_preemptions > 0
    assert any(p.preempted_seq_ids for p in ex.plans)
    for p in ex.plans:  # a victim is not re-admitted in its own step (that would thrash)
        assert not {s.seq_id for s in p.seqs if s.new} & set(p.preempted_seq_ids)
    for r in reqs:
        assert outs[r.request_id][-1].finish_reason == "length"
        assert tokens_of(outs[r.request_id]) == reference_tokens(r.prompt_token_ids, 20)
    assert stats.kv.num_free_blocks == 12
    assert not core.has_unfinished()


def test_preempted_request_is_resent_whole_as_new():
    ex = FakeExecutor(num_blocks=6, block_size=4)
    core, _ = make_core(ex, enable_prefix_caching=False)
    a = GenerateRequest("a", [1, 2, 3, 4, 5], greedy(max_tokens=12), arrival_time=1.0)
    b = GenerateRequest("b", [6, 7, 8, 9, 10], greedy(max_tokens=12), arrival_time=2.0)
    outs = run_to_end(core, [a, b])
    step = next(i for i, p in enumerate(ex.plans) if p.preempted_seq_ids)
    assert ex.plans[step].preempted_seq_ids == [1]  # the newest arrival goes first
    resent = next(s for p in ex.plans[step:] for s in p.seqs if s.seq_id == 1 and s.new)
    assert resent.new.num_prompt_tokens == 5 and resent.start_pos == 0
    assert len(resent.token_ids) > 5  # prompt + outputs so far, recomputed
    assert tokens_of(outs["a"]) == reference_tokens(a.prompt_token_ids, 12)
    assert tokens_of(outs["b"]) == reference_tokens(b.prompt_token_ids, 12)


def test_prompt_logprobs_survive_a_preemption():
    ex = FakeExecutor(num_blocks=6, block_size=4)
    core, _ = make_core(ex, max_num_batched_tokens=4)
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    a = GenerateRequest("a", [1, 2, 3, 4, 5, 6, 7], greedy(max_tokens=14), arrival_time=1.0)
    b = GenerateRequest("b", [9, 8, 7, 6, 5, 4, 3, 2, 1], sp, arrival_time=2.0)
    outs = run_to_end(core, [a, b])
    assert core.stats().scheduler.num_preemptions > 0
    lps = outs["b"][0].prompt_logprobs
    assert lps is not None and len(lps) == 9 and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == b.prompt_token_ids[1:]
    assert tokens_of(outs["b"]) == reference_tokens(b.prompt_token_ids, 10)


def test_max_len_is_capped_by_the_pool_capacity():
    ex = FakeExecutor(num_blocks=3, block_size=4, max_model_len=100)
    core, _ = make_core(ex)
    outs = run_to_end(core, [GenerateRequest("a", [1, 2, 3, 4, 5], greedy(max_tokens=50))])
    assert outs["a"][-1].finish_reason == "length"
    assert tokens_of(outs["a"]) == reference_tokens([1, 2, 3, 4, 5], 12 - 5)
    with pytest.raises(ValueError, match="KV cache has only 3"):
        core.add_request(GenerateRequest("b", list(range(1, 13)), greedy()))

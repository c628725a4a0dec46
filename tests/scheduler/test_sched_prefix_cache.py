"""Prefix caching through the scheduler: exact hit counts, same outputs, no false hits."""

from __future__ import annotations

from scheduler_fakes import FakeExecutor, greedy, make_core, reference_tokens, run_to_end, tokens_of

from tandem.engine.plan import SamplingParams
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

PROMPT = [(5 * i) % 37 + 1 for i in range(20)]  # 5 full blocks of 4


def new_plan_of(ex: FakeExecutor, seq_id: int):
    return next(s for p in ex.plans for s in p.seqs if s.seq_id == seq_id and s.new)


def test_shared_prefix_hits_the_expected_blocks():
    core, ex = make_core()
    run_to_end(core, [GenerateRequest("a", PROMPT, greedy(max_tokens=6))])
    other = PROMPT[:13] + [40, 41, 42, 43, 44, 45, 46]  # shares 3 full blocks (12 tokens)
    outs = run_to_end(core, [GenerateRequest("b", other, greedy(max_tokens=6))])
    assert outs["b"][-1].num_cached_tokens == 12
    plan = new_plan_of(ex, 1)
    assert plan.start_pos == 12 and plan.new.prefix_token_ids == other[:12]
    assert tokens_of(outs["b"]) == reference_tokens(other, 6)
    kv = core.stats().scheduler.kv
    assert (kv.prefix_query_tokens, kv.prefix_hit_tokens) == (40, 12)


def test_identical_prompt_leaves_its_last_token_to_compute():
    core, ex = make_core()
    first = run_to_end(core, [GenerateRequest("a", PROMPT, greedy(max_tokens=3))])
    again = run_to_end(core, [GenerateRequest("b", PROMPT, greedy(max_tokens=3))])
    assert again["b"][0].num_cached_tokens == 16  # 4 of 5 blocks: token 20 needs logits
    assert new_plan_of(ex, 1).token_ids == PROMPT[16:]
    assert tokens_of(again["b"]) == tokens_of(first["a"])


def test_blocks_filled_by_generated_tokens_are_cached_too():
    core, _ = make_core()
    outs = run_to_end(core, [GenerateRequest("a", PROMPT[:6], greedy(max_tokens=12))])
    history = PROMPT[:6] + tokens_of(outs["a"])  # 18 tokens; 17 computed = 4 full blocks
    follow_up = history + [3, 3]
    outs = run_to_end(core, [GenerateRequest("b", follow_up, greedy(max_tokens=4))])
    assert outs["b"][0].num_cached_tokens == 16
    assert tokens_of(outs["b"]) == reference_tokens(follow_up, 4)


def test_concurrent_identical_prompts_share_blocks_once_computed():
    core, ex = make_core(max_num_batched_tokens=8)
    reqs = [GenerateRequest(f"r{i}", PROMPT, greedy(max_tokens=5)) for i in range(2)]
    core.add_request(reqs[0])
    for _ in range(3):  # 24 > 20 prompt tokens: r0's prompt is computed (in 3 chunks)
        core.step()
    core.add_request(reqs[1])
    outs = {r.request_id: [] for r in reqs}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id].append(o)
    assert outs["r1"][0].num_cached_tokens == 16
    assert tokens_of(outs["r1"]) == reference_tokens(PROMPT, 5)
    assert core.stats().scheduler.kv.num_free_blocks == ex.info.num_blocks


def test_prompt_logprobs_requests_skip_the_cache_and_get_every_position():
    core, _ = make_core(max_num_batched_tokens=6)
    run_to_end(core, [GenerateRequest("a", PROMPT, greedy(max_tokens=2))])
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    outs = run_to_end(core, [GenerateRequest("b", PROMPT, sp)])["b"]
    assert outs[0].num_cached_tokens == 0
    lps = outs[0].prompt_logprobs
    assert lps is not None and len(lps) == len(PROMPT) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == PROMPT[1:]
    assert [lp.logprob for lp in lps[1:]] == [-float(p) for p in range(1, 20)]
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_no_false_hit_with_colliding_hashes_through_the_scheduler():
    ex = FakeExecutor()
    core = EngineCore(SchedulerConfig(), ex, hash_fn=lambda parent, tokens: 7)
    run_to_end(core, [GenerateRequest("a", PROMPT, greedy(max_tokens=2))])
    other = [9, 9, 9, 9] + PROMPT[4:]
    outs = run_to_end(core, [GenerateRequest("b", other, greedy(max_tokens=4))])
    assert outs["b"][0].num_cached_tokens == 0
    assert tokens_of(outs["b"]) == reference_tokens(other, 4)
    same_first = PROMPT[:4] + [9, 9, 9, 9, 1]
    outs = run_to_end(core, [GenerateRequest("c", same_first, greedy(max_tokens=4))])
    assert outs["c"][0].num_cached_tokens == 4  # block 1 collides with block 0: no hit
    assert tokens_of(outs["c"]) == reference_tokens(same_first, 4)


def test_prefix_caching_disabled_never_hits():
    core, ex = make_core(enable_prefix_caching=False)
    run_to_end(core, [GenerateRequest("a", PROMPT, greedy(max_tokens=2))])
    outs = run_to_end(core, [GenerateRequest("b", PROMPT, greedy(max_tokens=2))])
    assert outs["b"][0].num_cached_tokens == 0
    assert new_plan_of(ex, 1).start_pos == 0

"""Lookahead slots (KVCacheInfo.lookahead_slots, for overlapped decode): a sampling run
is also given the block of the position after it, from free blocks only, and keeps it
when its table is cut back. The fake executor checks every table against the plans."""

from __future__ import annotations

import pytest
from scheduler_fakes import FakeExecutor, greedy, make_core, reference_tokens, run_to_end, tokens_of

from tandem.engine.plan import SamplingParams
from tandem.scheduler.request import GenerateRequest


def prompts() -> list[list[int]]:
    return [[(i * 11 + j * 3) % 45 + 1 for j in range(6 + 3 * i)] for i in range(6)]


@pytest.mark.parametrize("num_blocks", [64, 12])  # roomy; tight enough to preempt
@pytest.mark.parametrize("budget", [32, 5])
def test_outputs_and_blocks_with_a_lookahead_slot(num_blocks, budget):
    ex = FakeExecutor(num_blocks=num_blocks, block_size=4, lookahead_slots=1)
    core, _ = make_core(ex, max_num_batched_tokens=budget)
    shared = prompts()[5][:9]  # a prefix-cache hit for the last request
    reqs = [GenerateRequest(f"r{i}", p, greedy(max_tokens=20)) for i, p in enumerate(prompts())]
    reqs.append(GenerateRequest("same-prefix", shared + [7, 7], greedy(max_tokens=9)))
    outs = run_to_end(core, reqs)
    for r in reqs:
        n = r.sampling.max_tokens
        assert tokens_of(outs[r.request_id]) == reference_tokens(r.prompt_token_ids, n)
    stats = core.stats().scheduler
    assert ex.num_ahead > 10  # runs were given the next block early
    assert stats.kv.num_free_blocks == num_blocks  # and every block came back
    assert (stats.num_preemptions > 0) == (num_blocks == 12)


def test_the_next_block_comes_with_the_run_before_it_and_stays():
    ex = FakeExecutor(num_blocks=16, block_size=4, lookahead_slots=1)
    core, _ = make_core(ex)
    run_to_end(core, [GenerateRequest("a", [1, 2, 3, 4, 5, 6], greedy(max_tokens=8))])
    given = [(p.seqs[0].start_pos, p.seqs[0].new_block_ids) for p in ex.plans]
    # prompt 0..5 (blocks 0, 1); its first output goes to position 6, then 7; position
    # 8 starts block 2, handed out with the run at position 7, not at 8
    assert [pos for pos, new in given if new] == [0, 7, 11]
    assert given[0][1] == [0, 1] and given[2][1] == [2] and given[6][1] == [3]


def test_no_slot_for_a_run_that_ends_the_request_nor_from_a_full_pool():
    # max_tokens 3: outputs at positions 4, 5, 6; the prompt's run gets the block of
    # position 4 with it; the run at position 5 samples the last output, so position
    # 6's KV is never written: no block for it
    ex = FakeExecutor(num_blocks=8, block_size=2, lookahead_slots=1)
    core, _ = make_core(ex)
    run_to_end(core, [GenerateRequest("a", [1, 2, 3, 4], greedy(max_tokens=3))])
    assert [len(p.seqs[0].new_block_ids) for p in ex.plans] == [3, 0, 0]  # positions 0..5
    # a pool with exactly the blocks two requests compute: a slot never preempts
    for slots in (0, 1):
        ex = FakeExecutor(num_blocks=6, block_size=2, lookahead_slots=slots)
        core, _ = make_core(ex)
        reqs = [GenerateRequest(f"r{i}", [i + 1] * 3, greedy(max_tokens=4)) for i in range(2)]
        outs = run_to_end(core, reqs)
        assert core.stats().scheduler.num_preemptions == 0
        for r in reqs:
            assert tokens_of(outs[r.request_id]) == reference_tokens(r.prompt_token_ids, 4)


def test_a_chunk_that_does_not_sample_gets_no_slot():
    ex = FakeExecutor(num_blocks=32, block_size=4, lookahead_slots=1)
    core, _ = make_core(ex, max_num_batched_tokens=4)
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    run_to_end(core, [GenerateRequest("a", list(range(1, 13)), sp)])  # chunks of 4
    chunks = [p.seqs[0] for p in ex.plans if not p.seqs[0].sample]
    assert [len(c.new_block_ids) for c in chunks] == [1, 1]  # positions 0..3, 4..7


def test_plans_say_when_the_next_step_may_admit():
    # budget 8: the second prompt waits while the first is prefilled; max_num_seqs 2:
    # the third waits for a free seat, so it cannot be admitted next step
    ex = FakeExecutor(num_blocks=64, block_size=4, lookahead_slots=1)
    core, _ = make_core(ex, max_num_batched_tokens=8, max_num_seqs=2)
    reqs = [GenerateRequest(f"r{i}", list(range(1, 11)), greedy(max_tokens=6)) for i in range(3)]
    run_to_end(core, reqs)
    flags = [(len(p.seqs), p.admits_next) for p in ex.plans]
    assert flags[0] == (1, True)  # r1 waits with a seat free
    two_running = [a for n, a in flags if n == 2]
    assert two_running and not any(two_running)  # r2 waits, but no seat: no admission
    assert flags[-1] == (1, False)


def test_a_request_waiting_for_blocks_is_not_an_admission_next_step():
    # 8 blocks of 4: r0 (10 prompt + 10 output tokens) holds 3..6 of them, r1's 24-token
    # prompt needs 6 in one chunk: it waits with a seat free until r0 is done, and the
    # plans meanwhile say no admission is coming (so an engine may guess the next step)
    ex = FakeExecutor(num_blocks=8, block_size=4, lookahead_slots=1)
    core, _ = make_core(ex, max_num_batched_tokens=32, max_num_seqs=4)
    reqs = [
        GenerateRequest("r0", list(range(1, 11)), greedy(max_tokens=10)),
        GenerateRequest("r1", list(range(101, 125)), greedy(max_tokens=2)),
    ]
    outs = run_to_end(core, reqs)
    assert all(tokens_of(outs[r.request_id]) for r in reqs)
    alone = [p.admits_next for p in ex.plans if [s.seq_id for s in p.seqs] == [0]]
    assert len(alone) == 10 and not any(alone)
    assert core.stats().scheduler.kv.num_free_blocks == 8

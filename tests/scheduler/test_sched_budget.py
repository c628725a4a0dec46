"""The token budget: decodes first, then chunks; chunked == unchunked; max_num_seqs."""

from __future__ import annotations

from scheduler_fakes import FakeExecutor, greedy, make_core, reference_tokens, run_to_end, tokens_of

from tandem.scheduler.request import GenerateRequest


def test_long_prompt_is_chunked_while_decodes_advance_every_step():
    core, ex = make_core(max_num_batched_tokens=16)
    short = GenerateRequest("short", [1, 2, 3], greedy(max_tokens=60))
    core.add_request(short)
    core.step()  # prefill, first token
    core.step()  # a decode
    assert ex.plans[-1].seqs[0].token_ids == [reference_tokens([1, 2, 3], 1)[0]]
    long_prompt = [(7 * i) % 40 + 1 for i in range(100)]
    core.add_request(GenerateRequest("long", long_prompt, greedy(max_tokens=4)))
    first = len(ex.plans)
    core.step()
    while core.num_running == 2 and len(ex.plans) < first + 100:
        core.step()
    assert core.num_running == 1  # "long" finished while "short" kept decoding
    steps = ex.plans[first:]
    long_chunks = [s for p in steps for s in p.seqs if s.seq_id == 1 and not s.sample]
    assert len(long_chunks) > 1  # the prompt took several steps
    for plan in steps:
        assert plan.num_tokens <= 16
        ids = [s.seq_id for s in plan.seqs]
        assert ids[0] == 0, "the running decode comes first, every step"
        decode = plan.seqs[0]
        assert len(decode.token_ids) == 1 and decode.sample
    # each chunk used what the decode left of the budget
    assert all(len(s.token_ids) == 15 for s in long_chunks[:-1])


def test_chunked_output_equals_unchunked_output():
    prompts = [[(i * 13 + j * 5) % 40 + 1 for j in range(20 + 9 * i)] for i in range(5)]

    def run(budget: int) -> dict[str, list[int]]:
        core, _ = make_core(max_num_batched_tokens=budget)
        reqs = [GenerateRequest(f"r{i}", p, greedy(max_tokens=12)) for i, p in enumerate(prompts)]
        return {k: tokens_of(v) for k, v in run_to_end(core, reqs).items()}

    big, small = run(2048), run(7)
    assert big == small
    for i, p in enumerate(prompts):
        assert big[f"r{i}"] == reference_tokens(p, 12)


def test_long_prefill_threshold_caps_each_chunk():
    core, ex = make_core(max_num_batched_tokens=64, long_prefill_token_threshold=10)
    prompts = [[i + 1] * 25 for i in range(3)]
    reqs = [GenerateRequest(f"r{i}", p, greedy(max_tokens=2)) for i, p in enumerate(prompts)]
    outs = run_to_end(core, reqs)
    assert max(len(s.token_ids) for p in ex.plans for s in p.seqs) == 10
    assert len(ex.plans[0].seqs) == 3  # three prompts share the first step
    for i, p in enumerate(prompts):
        assert tokens_of(outs[f"r{i}"]) == reference_tokens(p, 2)


def test_max_num_seqs_caps_running_requests():
    core, ex = make_core(max_num_seqs=3)
    reqs = [GenerateRequest(f"r{i}", [i + 1, 2, 3], greedy(max_tokens=5)) for i in range(7)]
    for r in reqs:
        core.add_request(r)
    outs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id] += o.new_token_ids
        assert core.num_running <= 3
        assert len(ex.plans[-1].seqs) <= 3
    assert max(len(p.seqs) for p in ex.plans) == 3
    for r in reqs:
        assert outs[r.request_id] == reference_tokens(r.prompt_token_ids, 5)


def test_step_stats_split_prefill_and_decode_tokens():
    core, _ = make_core(enable_prefix_caching=False)
    reqs = [GenerateRequest(f"r{i}", [i + 1] * (5 + i), greedy(max_tokens=6)) for i in range(3)]
    run_to_end(core, reqs)
    steps = core.stats().steps
    assert steps.num_prefill_tokens == 5 + 6 + 7
    assert steps.num_decode_tokens == 3 * 5  # the first token of each comes from its prefill
    assert steps.num_draft_tokens == 0
    assert steps.num_steps == len(steps.recent) == 6
    assert all(s.step_time_s >= s.execute_time_s > 0 for s in steps.recent)


def test_empty_plan_is_never_executed():
    ex = FakeExecutor(num_blocks=8, block_size=4)
    core, _ = make_core(ex)
    core.add_request(GenerateRequest("a", [1, 2], greedy(max_tokens=3)))
    out = core.abort_request("a")
    assert out is not None and out.finish_reason == "abort"
    assert core.step() == [] and ex.plans == []  # FakeExecutor asserts non-empty plans

"""Overlapped decode steps (engine.lookahead): the worker queues its guess of the next
step before this step's host sync; a plan that is the guess takes its results, a plan
that is the guess less some sequences (stopped, aborted) takes their rows, any other
plan drops it. On the CPU nothing overlaps, but the results must be those of the
plain path, whatever the plans do (arrivals, aborts, preemption, speculation): to the
bit where no batch under a taken guess lost a sequence, else the same tokens with
logprobs as close as another batch's rounding leaves them; and guesses must be taken,
not only made.
"""

from __future__ import annotations

import pytest
from test_spec_engine import CHUNKED, GREEDY, PROMPTS

from tandem.engine.builtin import BUILTIN_DRAFT, BUILTIN_TARGET
from tandem.engine.config import EngineConfig
from tandem.engine.executor import UniExecutor
from tandem.engine.lookahead import MAX_BACKOFF, Lookahead
from tandem.engine.plan import NewSeq, SamplingParams, SeqPlan, StepPlan
from tandem.engine.seq_state import SeqState
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest

needs_builtin = pytest.mark.skipif(
    not (BUILTIN_DRAFT / "model.safetensors").exists()
    or not (BUILTIN_TARGET / "model.safetensors").exists(),
    reason="built-in models not trained",
)

BLOCK_BYTES = 10 * 2 * 2 * 64 * 4 * 16  # target layers * K,V * kv heads * dim * fp32


def make_core(overlap: bool, spec=None, kv: int = 64 << 20, max_model_len=256, **sched):
    engine = EngineConfig(
        dtype="float32", kv_cache_memory=kv, max_model_len=max_model_len, overlap_decode=overlap
    )
    return EngineCore(SchedulerConfig(**sched), UniExecutor(engine, spec), spec=spec)


def generate(core: EngineCore, params, arrive_at=None, abort_at=None):
    """Request i arrives at step arrive_at[i] (default 0); abort_at = {step: request};
    returns each request's prompt logprobs, (token, logprob entry) pairs and finish
    reason."""
    arrive_at = arrive_at or [0] * len(params)
    abort_at = abort_at or {}
    out: dict[str, list] = {f"r{i}": [] for i in range(len(params))}
    reasons: dict[str, str | None] = {}
    step = 0
    while step <= max(arrive_at) or core.has_unfinished():
        for i, sp in enumerate(params):
            if arrive_at[i] == step:
                core.add_request(GenerateRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], sp))
        if step in abort_at:
            core.abort_request(abort_at[step])
        for o in core.step():
            if o.prompt_logprobs is not None:
                out[o.request_id].append(("prompt", o.prompt_logprobs))
            lps = o.new_logprobs or [None] * len(o.new_token_ids)
            out[o.request_id].extend(zip(o.new_token_ids, lps, strict=True))
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step += 1
    return out, reasons


def assert_close_outputs(got, ref, tol=1e-4):
    """The same tokens and finish reasons; logprobs within tol (rows taken from a guess
    whose batch lost sequences come from a larger batch: other float rounding)."""
    assert got[1] == ref[1]
    for rid, pairs in ref[0].items():
        assert [t for t, _ in got[0][rid]] == [t for t, _ in pairs], rid
        for (_, g), (_, r) in zip(got[0][rid], pairs, strict=True):
            assert g.token_id == r.token_id and g.rank == r.rank
            assert abs(g.logprob - r.logprob) <= tol, (rid, g, r)
            assert [t for t, _ in g.top] == [t for t, _ in r.top]


def lookahead_of(core: EngineCore) -> Lookahead:
    return core.executor.worker.lookahead


SAMPLED = [
    SamplingParams(
        temperature=0.5 + 0.2 * i,
        top_p=0.9 if i % 2 else 1.0,
        top_k=20 if i % 3 == 0 else 0,
        seed=7 + i,
        max_tokens=24 + 3 * i,
        logprobs=i % 3,
        logit_bias={5: 1.5} if i == 1 else {},
        ignore_eos=i % 2 == 0,
    )
    for i in range(5)
]
MIXED = [*SAMPLED[:3], SamplingParams(temperature=0.9, seed=1, repetition_penalty=1.2)]
STOPPED = [  # the built-in target's greedy outputs hold token 19 at outputs 29, 8, 13, 18
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[19], logprobs=1)
    for _ in range(4)
]
PROMPT_LOGPROBS = [  # chunked: chunks that return prompt logprobs and sample nothing
    SamplingParams(temperature=0.0, max_tokens=12 + i, ignore_eos=True, prompt_logprobs=1)
    for i in range(4)
]


@needs_builtin
@pytest.mark.parametrize(
    "case",
    [
        "greedy-chunked",
        "sampled-staggered",
        "sampled-aborted",
        "history-reading rows",
        "prompt logprobs, chunked",
        "stop tokens, an abort",
    ],
)
def test_overlapped_decode_gives_the_plain_path_outputs(case):
    params, kwargs, sched = {
        "greedy-chunked": (GREEDY, {}, CHUNKED),
        "sampled-staggered": (SAMPLED, {"arrive_at": [0, 0, 9, 15, 40]}, {}),
        "sampled-aborted": (SAMPLED, {"arrive_at": [0, 3, 3, 20, 21], "abort_at": {30: "r1"}}, {}),
        "history-reading rows": (MIXED, {"arrive_at": [0, 0, 0, 25]}, {}),
        "prompt logprobs, chunked": (PROMPT_LOGPROBS, {"arrive_at": [0, 4, 8, 12]}, CHUNKED),
        "stop tokens, an abort": (STOPPED, {"abort_at": {22: "r0"}}, {}),
    }[case]
    ref = generate(make_core(False, **sched), params, **kwargs)
    core = make_core(True, **sched)
    got = generate(core, params, **kwargs)
    if case == "stop tokens, an abort":
        assert_close_outputs(got, ref)
    else:  # batches under a taken guess never lost a sequence: the same to the bit
        assert got == ref
    la = lookahead_of(core)
    assert la.num_hits > 10, (la.num_hits, la.num_misses)
    steps = core.stats().steps  # what /metrics exports (tandem:overlap_guesses_total)
    assert (steps.num_guesses_taken, steps.num_guesses_dropped) == (la.num_hits, la.num_misses)
    if case == "greedy-chunked":  # 29 steps sample every sequence: all but the first
        # are guessed, block boundaries and requests ending by length included
        assert (la.num_hits, la.num_misses) == (28, 0)
    elif case == "stop tokens, an abort":  # requests leave under guesses: rows taken
        assert la.num_partial == 3 and la.num_misses == 0
    else:  # arrivals and aborts change the batch under a guess
        assert la.num_misses > 0


@needs_builtin
def test_overlapped_decode_survives_preemption():
    # 12 blocks of 16 tokens: 8 requests of up to ~50 tokens cannot all fit at once
    ref = generate(make_core(False), GREEDY[:8])
    core = make_core(True, kv=12 * BLOCK_BYTES, max_model_len=128)
    assert generate(core, GREEDY[:8]) == ref
    assert core.stats().scheduler.num_preemptions > 0
    assert lookahead_of(core).num_hits > 0


@needs_builtin
def test_overlapped_decode_beside_ngram_speculation():
    spec = SpeculativeConfig(
        speculative_method="ngram",
        speculation_policy="goodput",
        num_speculative_tokens=3,
        prompt_lookup_min=1,
    )
    ref = generate(make_core(False, spec, **CHUNKED), GREEDY)
    core = make_core(True, spec, **CHUNKED)
    assert generate(core, GREEDY) == ref
    assert core.stats().steps.num_accepted_drafts > 0
    assert lookahead_of(core).num_hits > 0  # steps where the controller chose k = 0


@needs_builtin
def test_overlapped_decode_is_refused_with_a_draft_model():
    spec = SpeculativeConfig(speculative_method="draft")
    core = make_core(True, spec)
    assert not lookahead_of(core).enabled
    core.shutdown()


# The lookahead's rules, on hand-made plans (block size 4, max_model_len 64).

PARAMS = SamplingParams(temperature=0.0, max_tokens=20)


def seq_state(num_tokens: int, blocks: list[int], params=PARAMS) -> SeqState:
    return SeqState(list(range(num_tokens)), list(blocks), params, num_prompt_tokens=5, seed=0)


def decode(seq_id: int, token: int, pos: int, **kw) -> SeqPlan:
    return SeqPlan(seq_id, [token], pos, [], True, **kw)


def held(states, plans) -> Lookahead:
    la: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    step = StepPlan(0, plans)
    follow = la.followers(step, states)
    assert follow is not None
    la.hold(step, states, follow, "queued")
    la.expect([50 + p.seq_id for p in plans])
    return la


def test_a_plan_that_is_the_guess_takes_it():
    states = [seq_state(6, [3, 8]), seq_state(9, [1, 2, 5])]
    la = held(states, [decode(0, 11, 5), decode(1, 12, 8)])  # next positions 6 and 9
    nxt = StepPlan(1, [decode(0, 50, 6), decode(1, 51, 9)])
    assert la.take(nxt, states) == ("queued", [0, 1]) and la.num_hits == 1
    assert la.num_partial == 0


def test_a_plan_less_some_sequences_takes_their_rows():
    """Sequences that finished (EOS, a stop string), were aborted or preempted are out
    of the next plan; the others take their rows of the guess."""
    states = [seq_state(6, [3, 8]), seq_state(9, [1, 2, 5]), seq_state(7, [4, 6])]
    plans = [decode(0, 11, 5), decode(1, 12, 8), decode(2, 13, 6)]
    a, b, c = decode(0, 50, 6), decode(1, 51, 9), decode(2, 52, 7)
    for seqs, rows in (([a, c], [0, 2]), ([c], [2]), ([a, b], [0, 1])):
        la = held(states, plans)
        assert la.take(StepPlan(1, seqs), [states[i] for i in rows]) == ("queued", rows)
        assert (la.num_hits, la.num_partial, la.num_misses) == (1, 1, 0)
    la = held(states, plans)  # less one, and another one's token differs: no
    assert la.take(StepPlan(1, [a, decode(2, 53, 7)]), [states[0], states[2]]) is None
    assert la.num_misses == 1


@pytest.mark.parametrize(
    "change",
    [
        "token",
        "position",
        "order",
        "k > 0",
        "new sequence",
        "resent as new",
        "block",
    ],
)
def test_any_other_plan_drops_the_guess(change):
    states = [seq_state(6, [3, 8]), seq_state(9, [1, 2, 5])]
    la = held(states, [decode(0, 11, 5), decode(1, 12, 8)])
    a, b = decode(0, 50, 6), decode(1, 51, 9)
    seqs = {
        "token": [a, decode(1, 52, 9)],
        "position": [a, decode(1, 51, 8)],
        "order": [b, a],
        "k > 0": [a, decode(1, 51, 9, num_draft=2, draft_token_ids=[1, 2])],
        "new sequence": [a, b, decode(2, 9, 0, new=NewSeq(PARAMS, 1))],
        "resent as new": [a, decode(1, 51, 9, new=NewSeq(PARAMS, 9, list(range(9))))],
        "block": [a, b],
    }[change]
    if change == "block":
        states[1].block_table[2] = 9  # the sequence's block at position 9 changed hands
    by_id = {0: states[0], 1: states[1], 2: seq_state(1, [7])}
    assert la.take(StepPlan(1, seqs), [by_id[p.seq_id] for p in seqs]) is None
    assert la.num_misses == 1 and la.guess is None


@pytest.mark.parametrize(
    "why",
    [
        "next block not held",
        "max_tokens",
        "max_model_len",
        "penalty",
        "min_tokens",
        "k > 0",
        "chunk",
    ],
)
def test_no_guess_where_the_next_plan_cannot_be_guessed(why):
    la: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    params, pos, plan_kw, num_tokens = PARAMS, 5, {}, 6
    if why == "next block not held":
        pos, num_tokens = 11, 12  # the next position, 12, starts a block nobody sent
    elif why == "max_tokens":  # the only sequence ends: nothing to continue
        params = SamplingParams(temperature=0.0, max_tokens=2)  # outputs at 5 and 6: done
    elif why == "max_model_len":
        la.max_model_len = 7
    elif why == "penalty":
        params = SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=0.5)
    elif why == "min_tokens":
        params = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=4)
    elif why == "k > 0":
        plan_kw = {"num_draft": 1, "draft_token_ids": [3]}
    states = [seq_state(num_tokens, [3, 8, 4], params)]
    plan = decode(0, 1, pos, **plan_kw)
    if why == "chunk":
        plan = SeqPlan(0, [1, 2], 4, [], False)  # a prompt chunk that does not sample
    assert la.followers(StepPlan(0, [plan]), states) is None
    fresh: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    assert fresh.followers(StepPlan(0, [decode(0, 1, 5)]), [seq_state(6, [3, 8])]) == [0]


def test_at_a_block_boundary_only_a_held_block_is_guessed_into():
    plan = StepPlan(0, [decode(0, 1, 7)])  # the next position, 8, starts block 2
    with_block, without = [seq_state(8, [3, 8, 4])], [seq_state(8, [3, 8])]
    la: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    assert la.slots == 1  # the scheduler reserves that block when it is free
    assert la.followers(plan, with_block) == [0] and la.followers(plan, without) is None
    la.slots = 0  # a scheduler that does not: the next plan would drop the block
    assert la.followers(plan, with_block) is None


def test_no_guess_when_the_scheduler_will_admit_next():
    states = [seq_state(6, [3, 8])]
    la: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    assert la.followers(StepPlan(0, [decode(0, 1, 5)], admits_next=True), states) is None
    assert la.followers(StepPlan(0, [decode(0, 1, 5)]), states) == [0]


def test_misses_in_a_row_pause_guessing_longer_and_longer():
    states = [seq_state(6, [3, 8])]
    plan = StepPlan(0, [decode(0, 11, 5)])
    pauses = []
    la: Lookahead = Lookahead(True, block_size=4, max_model_len=64)
    for _ in range(9):
        la.hold(plan, states, [0], "queued")
        la.expect([50])
        assert la.take(StepPlan(1, [decode(0, 49, 6)]), states) is None  # wrong token
        n = 0
        while la.followers(plan, states) is None:
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 8, 16, 16, 16, 16, 16] and MAX_BACKOFF == 16
    la.hold(plan, states, [0], "queued")
    la.expect([50])
    assert la.take(StepPlan(1, [decode(0, 50, 6)]), states) == ("queued", [0])  # a hit resets it
    la.hold(plan, states, [0], "queued")
    la.expect([50])
    la.take(StepPlan(1, [decode(0, 49, 6)]), states)
    assert la.followers(plan, states) is None and la.followers(plan, states) == [0]

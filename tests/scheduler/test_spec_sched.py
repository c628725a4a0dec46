"""The scheduler with speculation, against a fake executor that speculates.

Outputs must equal the unbatched, unspeculated reference token for token (greedy is
exact by construction of verification), drafts must actually be accepted, and the
block accounting must be exact after every step: a running request holds exactly the
blocks of its computed tokens, and no block leaks, also across preemptions.
"""

from __future__ import annotations

import pytest
from scheduler_fakes import greedy, tokens_of
from spec_fakes import SpecFakeExecutor, cyclic_next_token, reference

from tandem.engine.plan import StepPlan
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest, RequestStatus


def make(spec: SpeculativeConfig | None, ex: SpecFakeExecutor, **config) -> EngineCore:
    return EngineCore(SchedulerConfig(**config), ex, spec=spec, step_timer=ex.timer)


def repetitive_prompt(i: int, n: int) -> list[int]:
    """Prompts with repeats, so n-gram lookup finds matches."""
    unit = [(i * 3 + j) % 40 + 1 for j in range(5)]
    return (unit * (n // 5 + 1))[:n]


def check_blocks(core: EngineCore) -> None:
    """Each running request holds exactly the blocks of its computed tokens, and every
    block is either held by a running request or free (no leak)."""
    s = core.scheduler
    held: set[int] = set()
    for req in s.running:
        assert len(req.block_ids) == s.pool.blocks_for(req.num_computed_tokens), req.request_id
        held.update(req.block_ids)
    assert s.pool.num_free_blocks == s.pool.num_blocks - len(held)


def run_checked(core: EngineCore, reqs: list[GenerateRequest], max_steps: int = 4000):
    for r in reqs:
        core.add_request(r)
    outs: dict[str, list] = {r.request_id: [] for r in reqs}
    for _ in range(max_steps):
        if not core.has_unfinished():
            check_blocks(core)
            return {rid: tokens_of(o) for rid, o in outs.items()}, outs
        for o in core.step():
            outs[o.request_id].append(o)
        check_blocks(core)
    raise AssertionError("unfinished")


CASES = [
    ("ngram", "fixed"),
    ("ngram", "goodput"),
    ("draft", "fixed"),
    ("draft", "goodput"),
]


@pytest.mark.parametrize("method,policy", CASES)
def test_outputs_exact_drafts_accepted_blocks_exact(method, policy):
    spec = SpeculativeConfig(
        speculative_method=method,
        speculation_policy=policy,
        num_speculative_tokens=3,
        prompt_lookup_min=1,
    )
    ex = SpecFakeExecutor(
        num_blocks=256, draft_model=method == "draft", next_token=cyclic_next_token
    )
    core = make(spec, ex, max_num_batched_tokens=24, long_prefill_token_threshold=9)
    reqs = [
        GenerateRequest(f"r{i}", repetitive_prompt(i, 6 + 4 * i), greedy(max_tokens=20 + i))
        for i in range(10)
    ]
    toks, outs = run_checked(core, reqs)
    for r in reqs:
        want = reference(r.prompt_token_ids, r.sampling.max_tokens, cyclic_next_token)
        assert toks[r.request_id] == want
    stats = core.stats().scheduler.spec
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens
    assert sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert sum(stats.k_histogram[1:]) == stats.num_drafts
    assert all(p.num_tokens <= 24 for p in ex.plans)  # drafts count against the budget
    assert any(  # decodes with drafts shared steps with prefill chunks
        any(s.num_draft for s in p.seqs) and any(not s.sample for s in p.seqs) for p in ex.plans
    )
    last = {rid: o[-1] for rid, o in outs.items()}
    assert sum(o.num_accepted_draft_tokens for o in last.values()) == stats.num_accepted_tokens
    assert core.stats().steps.num_accepted_drafts == stats.num_accepted_tokens


def test_policy_off_and_no_spec_agree():
    reqs = [GenerateRequest(f"r{i}", repetitive_prompt(i, 9), greedy(12)) for i in range(4)]
    off = SpeculativeConfig(speculative_method="ngram", speculation_policy="off")
    core = make(off, SpecFakeExecutor())
    toks, _ = run_checked(core, reqs)
    assert core.scheduler.spec is None and core.stats().scheduler.spec is None
    assert all(toks[r.request_id] == reference(r.prompt_token_ids, 12) for r in reqs)


def test_drafts_never_run_past_max_tokens_or_a_request_cap():
    spec = SpeculativeConfig(
        speculative_method="draft", speculation_policy="fixed", num_speculative_tokens=4
    )
    ex = SpecFakeExecutor(draft_model=True, draft_is_right=lambda ctx: True)
    core = make(spec, ex)
    reqs = [
        GenerateRequest("capped", [1, 2, 3], greedy(9), max_draft_tokens=2),
        GenerateRequest("off", [4, 5, 6], greedy(9), max_draft_tokens=0),
        GenerateRequest("short", [7, 8, 9], greedy(3)),
    ]
    toks, _ = run_checked(core, reqs)
    ids = {core.scheduler._next_seq_id - 3 + i: r.request_id for i, r in enumerate(reqs)}
    k_max = {"capped": 0, "off": 0, "short": 0}
    for p in ex.plans:
        for s in p.seqs:
            k_max[ids[s.seq_id]] = max(k_max[ids[s.seq_id]], s.num_draft)
    # an always-right draft: "short" (3 tokens) needs one decode with k = 1 after its
    # first token; "capped" never exceeds 2; "off" never speculates
    assert k_max == {"capped": 2, "off": 0, "short": 1}
    assert toks["short"] == reference([7, 8, 9], 3)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_in_the_middle_of_speculation_loses_nothing(method):
    spec = SpeculativeConfig(
        speculative_method=method,
        speculation_policy="fixed",
        num_speculative_tokens=4,
        prompt_lookup_min=1,
    )
    ex = SpecFakeExecutor(
        num_blocks=14, block_size=4, draft_model=method == "draft", next_token=cyclic_next_token
    )
    core = make(spec, ex, enable_prefix_caching=False)
    reqs = [GenerateRequest(f"r{i}", repetitive_prompt(i, 7), greedy(20)) for i in range(5)]
    toks, _ = run_checked(core, reqs)
    for r in reqs:
        assert toks[r.request_id] == reference(r.prompt_token_ids, 20, cyclic_next_token)
    stats = core.stats().scheduler
    assert stats.num_preemptions > 0 and stats.spec.num_accepted_tokens > 0
    preempted_while_speculating = any(
        any(s.num_draft for s in p.seqs) and p.preempted_seq_ids for p in ex.plans
    )
    assert preempted_while_speculating


def test_rejections_give_back_their_blocks():
    """An always-wrong draft with k = 4 over blocks of 2: every window asks for ~3
    blocks, every verification keeps none of the drafts, and the blocks go back."""
    spec = SpeculativeConfig(speculative_method="draft", speculation_policy="fixed")
    ex = SpecFakeExecutor(
        num_blocks=40, block_size=2, draft_model=True, draft_is_right=lambda ctx: False
    )
    core = make(spec, ex)
    core.add_request(GenerateRequest("r", [1, 2, 3], greedy(10)))
    pool = core.scheduler.pool
    while core.has_unfinished():
        core.step()
        req = core.scheduler.running[0] if core.scheduler.running else None
        if req is not None and req.status == RequestStatus.RUNNING:
            assert pool.num_free_blocks == 40 - pool.blocks_for(req.num_computed_tokens)
    assert pool.num_free_blocks == 40
    stats = core.stats().scheduler.spec
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == 0


def _batch_cost(plan: StepPlan) -> tuple[float, float]:
    """A roofline fake: 2 ms up to 16 batched tokens, then 0.4 ms more per token; the
    draft model (when anyone speculates) 0.3 ms a forward + 0.02 ms per token."""
    depth = max(s.num_draft for s in plan.seqs)
    if depth == 0:
        return 0.002 + 0.0004 * max(0, plan.num_tokens - 16), 0.0
    catch_up = sum(len(s.token_ids) for s in plan.seqs)  # (the backlog left out)
    draft_tokens = catch_up + sum(max(s.num_draft - 1, 0) for s in plan.seqs)
    target = 0.002 + 0.0004 * max(0, plan.num_tokens - 16)
    return target, 0.0003 * depth + 0.00002 * draft_tokens


def test_goodput_closed_loop_speculates_alone_and_stops_under_load():
    """Step times come from the fake's synthetic clock (scheduling costs nothing on
    it), so the controller sees exactly _batch_cost and the run is deterministic."""
    spec = SpeculativeConfig(speculative_method="draft", num_speculative_tokens=4)
    ex = SpecFakeExecutor(
        num_blocks=1024,
        draft_model=True,
        step_cost_s=_batch_cost,
        draft_is_right=lambda ctx: sum(ctx) % 10 != 0,
    )
    core = make(spec, ex)
    toks, _ = run_checked(core, [GenerateRequest("alone", [1, 2, 3], greedy(60))])
    alone = [s.num_draft for p in ex.plans[3:-3] for s in p.seqs]  # not the ends
    assert sorted(alone)[len(alone) // 2] >= 2, alone
    ex.plans.clear()
    reqs = [GenerateRequest(f"r{i}", [i + 1, 2, 3], greedy(40)) for i in range(48)]
    run_checked(core, reqs)
    busy = [s.num_draft for p in ex.plans[-20:] for s in p.seqs]
    # off, but for rare exploring drafts (one every 32 idle steps)
    assert sum(busy) <= 2, busy

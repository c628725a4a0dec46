"""The speculation planner's bar for speculating with the draft model: the goodput of
decode work only, and a predicted gain beyond the cost model's recent error."""

from __future__ import annotations

import random

from tandem.engine.plan import SamplingParams, SeqPlan
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.cost_model import MarginalCosts, StepFeatures
from tandem.scheduler.kv_blocks import BlockPool
from tandem.scheduler.request import Request
from tandem.scheduler.spec_control import Candidate, choose_k, predicted_goodput
from tandem.scheduler.speculation import SpecPlanner


def planner(method: str = "ngram") -> SpecPlanner:
    spec = SpeculativeConfig(speculative_method=method, num_speculative_tokens=4)
    return SpecPlanner(spec, BlockPool(256, 16, False), max_len=1024)


def decode(seq_id: int) -> SeqPlan:
    return SeqPlan(seq_id, [7], 100, [], True)


def running(plans: list[SeqPlan]) -> list[tuple[Request, SeqPlan]]:
    """Requests decoding these plans (100 tokens in, none of them in the draft's KV)."""
    return [
        (Request(f"r{sp.seq_id}", sp.seq_id, SamplingParams(max_tokens=50), [7] * 101, 90, 0.0), sp)
        for sp in plans
    ]


def test_a_prompt_chunk_in_the_step_does_not_lower_the_bar():
    """Verified drafts cost 1 ms each, decodes 0.1 ms, the step 5 ms: with acceptance
    0.5 speculating loses for 4 decodes. A 400-token prompt chunk in the same step costs
    40 ms whatever k is; counted in the step's base it would make drafts look cheap."""
    p = planner("draft")
    rng = random.Random(0)
    for _ in range(200):  # fit the cost model to the truth
        batch, drafts, chunk = rng.randint(8, 64), rng.randint(0, 128), rng.choice([0, 0, 300])
        f = StepFeatures(batch + drafts + chunk, 100 * batch, 0, 0, verify_tokens=drafts)
        p.costs.observe(f, 0.005 + 0.0001 * f.batched_tokens + 0.001 * drafts, 0.0)
    cands = [Candidate(4, [0.5] * 4) for _ in range(4)]
    plans = [decode(i) for i in range(4)]
    chunk = SeqPlan(9, [3] * 400, 0, [], False)
    # (the draft model's own costs are not fitted here: 0; catch_up = 4 tokens). At most
    # one exploring draft, and the same with the chunk as without
    chosen = running(plans)
    plain = p._choose(cands, chosen, plans, 4, budget=64, horizon=10)
    assert sum(plain[0]) <= 1
    assert p._choose(cands, chosen, [*plans, chunk], 404, budget=64, horizon=10) == plain
    # and with acceptance that pays, the chunk does not stop it either
    sure = [Candidate(4, [1.0] * 4) for _ in range(4)]
    ks, exploring = p._choose(sure, chosen, [*plans, chunk], 404, budget=64, horizon=10)
    assert any(ks) and not exploring


def test_a_gain_inside_the_prediction_error_is_not_taken():
    """The draft model's planner passes its prediction error to choose_k as the margin."""
    cands = [Candidate(4, [0.6] * 4) for _ in range(4)]
    ks = [1, 1, 1, 1]
    costs = MarginalCosts(base_time=10.0, per_draft_token=1.3)
    gain = predicted_goodput(ks, cands, costs, 4) * costs.base_time / 4
    assert 1.04 < gain < 1.06  # 6.4 tokens in 15.2 ms against 4 in 10
    assert choose_k(cands, costs, 4, 64) == ks  # the best choice
    assert choose_k(cands, costs, 4, 64, margin=0.10) == [0, 0, 0, 0]
    assert choose_k(cands, costs, 4, 64, margin=0.02) == ks


def test_the_prediction_error_follows_measured_steps():
    from tandem.engine.plan import StepPlan, StepResult

    p = planner()
    p.costs.observe(StepFeatures(4, 400, 0, 0), 0.010, 0.0)
    for step_id in range(100):  # every step takes 20% longer than predicted
        plans = {i: decode(i) for i in range(4)}
        p.plan_drafts(step_id, plans, [], budget=0, by_seq={})
        predicted = p._planned.predicted_s
        plan = StepPlan(step_id, list(plans.values()))
        p.on_step(plan, StepResult(step_id, []), 1.2 * predicted, by_seq={})
    assert abs(p.prediction_error - 0.2) < 0.01


def test_an_exploring_step_catches_up_the_explored_request_only():
    """64 decodes whose draft KV lags 40 tokens, speculation not paying: after
    EXPLORE_EVERY idle steps one request gets one draft, and the draft model catches
    up that request alone (6 tokens, not 64 backlogs: at 0.01 ms a token those would
    cost 26 ms, more than exploring may give up, so it would never explore)."""
    from tandem.engine.plan import StepPlan, StepResult
    from tandem.scheduler.request import RequestStatus
    from tandem.scheduler.spec_control import RequestSpec
    from tandem.scheduler.speculation import EXPLORE_EVERY

    p = planner("draft")
    rng = random.Random(0)
    for _ in range(100):  # target 5 ms + 0.1 ms a token (+ 0.3 ms a verified draft);
        # draft 1 ms a forward + 0.01 ms a token
        batch, drafts = rng.randint(8, 64), rng.randint(0, 64)
        f = StepFeatures(batch + drafts, 100 * batch, 1 + drafts // 32, batch + drafts, drafts)
        target_s = 0.005 + 0.0001 * f.batched_tokens + 0.0003 * drafts
        p.costs.observe(f, target_s, 0.001 * f.draft_forwards + 0.00001 * f.draft_tokens)
    chosen = running([decode(i) for i in range(64)])
    by_seq = {sp.seq_id: req for req, sp in chosen}
    for req, _ in chosen:
        req.status = RequestStatus.RUNNING
        req.spec = RequestSpec([0.2] * 4, draft_computed=60)
    by_seq[5].spec = RequestSpec([0.5] * 4, draft_computed=95)  # the most promising
    reqs = list(by_seq.values())
    for step_id in range(EXPLORE_EVERY):
        seqs = {req.seq_id: decode(req.seq_id) for req in reqs}
        p.plan_drafts(step_id, seqs, reqs, budget=256, by_seq=by_seq)
        if any(sp.num_draft for sp in seqs.values()):
            break
        p.on_step(StepPlan(step_id, list(seqs.values())), StepResult(step_id, []), 0.011, by_seq)
    assert step_id == EXPLORE_EVERY - 1
    assert {
        s: (sp.num_draft, sp.draft_catch_up) for s, sp in seqs.items() if sp.draft_catch_up
    } == {5: (1, True)}
    assert p._planned.features.draft_tokens == 101 - 95  # its backlog and this step's token
    plan = StepPlan(step_id, list(seqs.values()))
    p.on_step(plan, StepResult(step_id, []), 0.013, by_seq)
    assert by_seq[5].spec.draft_computed == 101  # (its draft was rejected)
    assert {req.spec.draft_computed for req in reqs if req.seq_id != 5} == {60}


def test_a_look_back_after_an_all_kept_window_observes_the_next_position():
    """k = 2 with both drafts kept: the next step's look-back (draft 3 of that window
    against the bonus token) updates position 3 only; after a window with a rejection,
    or at K, a look-back observes nothing."""
    from tandem.engine.plan import SeqResult

    p = planner("draft")
    ((req, _),) = running([decode(0)])
    rates = p._state(req).rates
    window = SeqPlan(0, [7], 100, [], True, num_draft=2)
    p.on_result(req, window, SeqResult(0, [1, 2, 3], num_accepted_drafts=2))
    before = list(rates)
    p.on_result(req, window, SeqResult(0, [4, 5], num_accepted_drafts=1, lookback_accepted=False))
    assert rates[2] < before[2] and rates[3] == before[3]
    assert rates[0] > before[0] and rates[1] < before[1]  # this window: kept 1 of 2
    before = list(rates)
    p.on_result(req, window, SeqResult(0, [6, 7], num_accepted_drafts=1, lookback_accepted=True))
    assert rates[2] == before[2]  # the window before kept only one: nothing to look back at
    full = SeqPlan(0, [7], 100, [], True, num_draft=4)
    p.on_result(req, full, SeqResult(0, [1, 2, 3, 4, 5], num_accepted_drafts=4))
    before = list(rates)
    p.on_result(req, decode(0), SeqResult(0, [9], lookback_accepted=False))
    assert rates == before  # K = 4 kept: there is no position 5

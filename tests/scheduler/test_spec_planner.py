"""The speculation planner's bar for speculating with the draft model: the goodput of
decode work only, and a predicted gain beyond the cost model's recent error."""

from __future__ import annotations

import random

from tandem.engine.plan import SeqPlan
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.cost_model import MarginalCosts, StepFeatures
from tandem.scheduler.kv_blocks import BlockPool
from tandem.scheduler.spec_control import Candidate, predicted_goodput
from tandem.scheduler.speculation import SpecPlanner


def planner(method: str = "ngram") -> SpecPlanner:
    spec = SpeculativeConfig(speculative_method=method, num_speculative_tokens=4)
    return SpecPlanner(spec, BlockPool(256, 16, False), max_len=1024)


def decode(seq_id: int) -> SeqPlan:
    return SeqPlan(seq_id, [7], 100, [], True)


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
    plain = p._choose(cands, plans, 4, budget=64, horizon=10)
    assert sum(plain) <= 1
    assert p._choose(cands, [*plans, chunk], 404, budget=64, horizon=10) == plain
    # and with acceptance that pays, the chunk does not stop it either
    sure = [Candidate(4, [1.0] * 4) for _ in range(4)]
    assert any(p._choose(sure, [*plans, chunk], 404, budget=64, horizon=10))


def test_a_gain_inside_the_prediction_error_is_not_taken():
    p = planner()
    cands = [Candidate(4, [0.6] * 4) for _ in range(4)]
    ks = [1, 1, 1, 1]
    costs = MarginalCosts(base_time=10.0, per_draft_token=1.3)
    gain = predicted_goodput(ks, cands, costs, 4) * costs.base_time / 4
    assert 1.04 < gain < 1.06  # 6.4 tokens in 15.2 ms against 4 in 10
    p.prediction_error = 0.10
    assert p._beyond_noise(ks, cands, costs, 4) == [0, 0, 0, 0]
    p.prediction_error = 0.02
    assert p._beyond_noise(ks, cands, costs, 4) == ks


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

"""The goodput controller with synthetic costs and acceptance, and its statistics.

Costs are in milliseconds (the controller only uses ratios). The synthetic step-cost
model is a GPU-like one: a large fixed cost per step (weights are read once, whatever
the batch) plus a cost per batched token that dominates once the batch is large.
"""

from __future__ import annotations

import itertools
import random

import pytest

from tandem.scheduler.cost_model import (
    MarginalCosts,
    OnlineLinearModel,
    StepCostModel,
    StepFeatures,
)
from tandem.scheduler.spec_control import (
    AcceptanceTracker,
    Candidate,
    _any_depth_pays,
    choose_k,
    expected_tokens,
    predicted_goodput,
)

K = 4
# A draft-model setup: 10 ms per target step + 0.25 ms per token, a draft forward
# costs 0.6 ms + 0.02 ms per row (draft 1 comes from the catch-up forward).
DRAFT_COSTS = dict(per_draft_forward=0.6, per_draft_row=0.02)


def costs_for(batch: int, per_token: float = 0.25, fixed: float = 10.0, **draft) -> MarginalCosts:
    """Marginal costs of a step that decodes `batch` requests (k = 0: one token each)."""
    d = {**DRAFT_COSTS, **draft}
    return MarginalCosts(
        base_time=fixed + per_token * batch,
        per_draft_token=per_token,
        draft_catch_up=d["per_draft_forward"] + d["per_draft_row"] * batch,
        per_draft_forward=d["per_draft_forward"],
        per_draft_row=d["per_draft_row"],
    )


def brute_force(cands, costs, base_tokens, budget) -> float:
    best = 0.0
    for ks in itertools.product(*[range(c.max_k + 1) for c in cands]):
        if sum(ks) <= budget:
            best = max(best, predicted_goodput(list(ks), cands, costs, base_tokens))
    return best


def random_case(rng: random.Random, min_k: int = 0):
    """1-4 candidates (max_k in min_k..3, random rates), random costs, base tokens."""
    n = rng.randint(1, 4)
    cands = [
        Candidate(rng.randint(min_k, 3), [rng.uniform(0.05, 1.0) for _ in range(3)])
        for _ in range(n)
    ]
    costs = MarginalCosts(
        base_time=rng.uniform(1, 20),
        per_draft_token=rng.choice([0.0, rng.uniform(0, 3)]),
        draft_catch_up=rng.choice([0.0, rng.uniform(0, 8)]),
        per_draft_forward=rng.choice([0.0, rng.uniform(0, 5)]),
        per_draft_row=rng.uniform(0, 1),
    )
    return cands, costs, n + rng.randint(0, 2)


def test_choose_k_equals_brute_force_on_random_cases():
    rng = random.Random(0)
    for trial in range(300):
        cands, costs, base_tokens = random_case(rng)
        budget = rng.randint(0, 8)
        ks = choose_k(cands, costs, base_tokens, budget)
        assert sum(ks) <= budget and all(0 <= k <= c.max_k for k, c in zip(ks, cands, strict=True))
        got = predicted_goodput(ks, cands, costs, base_tokens)
        want = brute_force(cands, costs, base_tokens, budget)
        assert got == pytest.approx(want, rel=1e-9), (trial, ks)


def test_the_no_depth_pays_screen_never_hides_a_better_choice():
    """choose_k's screen: where it says no depth pays, brute force finds nothing better
    than k = 0 everywhere; and it does say so on a good share of random cases."""
    rng = random.Random(1)
    said_no = 0
    for _ in range(400):
        cands, costs, base_tokens = random_case(rng, min_k=1)
        lam = base_tokens / costs.base_time
        if not _any_depth_pays(cands, costs, lam):
            said_no += 1
            assert brute_force(cands, costs, base_tokens, 99) <= lam * (1 + 1e-12)
    assert 100 < said_no < 350, said_no


def test_with_a_margin_choose_k_gives_up_only_what_the_margin_rejects():
    rng = random.Random(2)
    gave_up = 0
    for _ in range(300):
        n = rng.randint(1, 4)
        cands = [Candidate(rng.randint(1, 3), [rng.uniform(0.3, 1.0)] * 3) for _ in range(n)]
        costs = MarginalCosts(
            base_time=rng.uniform(1, 20),
            per_draft_token=rng.uniform(0, 2),
            draft_catch_up=rng.uniform(0, 4),
            per_draft_forward=rng.uniform(0, 2),
            per_draft_row=rng.uniform(0, 0.5),
        )
        base_tokens, margin = n, rng.uniform(0, 0.3)
        plain = choose_k(cands, costs, base_tokens, 99)
        ks = choose_k(cands, costs, base_tokens, 99, margin)
        if any(ks):
            assert ks == plain
        elif any(plain):
            gave_up += 1
            gain = predicted_goodput(plain, cands, costs, base_tokens) * costs.base_time / n
            assert gain <= 1 + margin + 1e-12
    assert gave_up > 10, gave_up


def test_high_acceptance_and_few_requests_speculate():
    cands = [Candidate(K, [0.9] * K)]
    ks = choose_k(cands, costs_for(1), 1, budget=100)
    assert ks[0] > 0


def test_low_acceptance_does_not_speculate():
    cands = [Candidate(K, [0.03] * K) for _ in range(2)]
    assert choose_k(cands, costs_for(2), 2, budget=100) == [0, 0]


def test_full_batch_leaves_no_budget():
    cands = [Candidate(K, [0.9] * K) for _ in range(4)]
    assert choose_k(cands, costs_for(4), 4, budget=0) == [0] * 4
    # a little budget goes to the requests anyway, never more than it allows
    assert sum(choose_k(cands, costs_for(4), 4, budget=3)) == 3


def roofline_ms(f: StepFeatures) -> tuple[float, float]:
    """(target, draft) ms of a GPU-like step: the target's time is flat (memory-bound)
    up to 32 batched tokens, then grows 0.2 ms per token (compute-bound); a draft
    forward costs 0.5 ms + 0.005 ms per token."""
    target = 5.0 + 0.2 * max(0, f.batched_tokens - 32)
    return target, 0.5 * f.draft_forwards + 0.005 * f.draft_tokens


def closed_loop_k(model: StepCostModel, batch: int, rates: list[float], steps: int) -> int:
    """Run `steps` steps at a batch size: choose k with the fitted model, measure the
    roofline's time, fit; returns the k of the last step (all requests get the same)."""
    ks = [0] * batch
    behind = 1  # steps of tokens the draft model's KV lacks (it runs only to speculate)
    for _ in range(steps):
        cands = [Candidate(K, rates) for _ in range(batch)]
        base = StepFeatures(batch, 200 * batch, 0, 0)
        if model.ready:
            ks = choose_k(cands, model.marginal(base, behind * batch), batch, budget=2048)
        depth = max(ks)
        rows = behind * batch + sum(max(k - 1, 0) for k in ks)
        f = StepFeatures(batch + sum(ks), 200 * batch + sum(ks), depth, rows if depth else 0)
        behind = 1 if depth else behind + 1
        target_ms, draft_ms = roofline_ms(f)
        model.observe(f, target_ms / 1000, draft_ms / 1000)
        assert ks == [ks[0]] * batch  # identical requests get the same k
    return ks[0]


def test_vllm_26504_flat_acceptance_flips_with_batch_size_and_comes_back():
    """Acceptance stays ~0.9 while the batch grows from 1 to 32 (vLLM #26504): the
    closed loop (choose k, measure, fit) speculates at batch 1, stops by batch 32 where
    verification makes the step compute-bound, and speculates again when load drops."""
    rates = [0.9, 0.88, 0.9, 0.87]
    model = StepCostModel(decay=0.9)
    chosen = [(b, closed_loop_k(model, b, rates, 40)) for b in (1, 2, 4, 8, 16, 32, 8, 1)]
    k = dict(chosen[:6])
    assert k[1] >= 3, chosen
    assert k[32] == 0, chosen
    assert [k[b] for b in (1, 2, 4, 8, 16, 32)] == sorted(k.values(), reverse=True), chosen
    assert chosen[6][1] > 0 and chosen[7][1] == k[1], chosen  # load drops: k comes back


def test_per_request_acceptance_gets_per_request_k():
    good, bad = Candidate(K, [0.95] * K), Candidate(K, [0.1] * K)
    ks = choose_k([good, bad, good], costs_for(3), 3, budget=100)
    assert ks[0] == ks[2] > 0 and ks[1] == 0


def test_ngram_costs_nothing_to_propose_so_k_is_larger():
    cands = [Candidate(K, [0.6] * K)]
    draft = choose_k(cands, costs_for(1, per_draft_forward=3.0), 1, budget=100)
    free = MarginalCosts(base_time=10.25, per_draft_token=0.25)  # n-gram: no draft costs
    ngram = choose_k(cands, free, 1, budget=100)
    assert ngram[0] == K > draft[0]


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_acceptance_tracker_observes_reached_positions_only():
    t = AcceptanceTracker(3, initial_rate=0.5, request_weight=0.5, global_weight=0.5)
    rates = t.new_rates()
    t.observe(rates, num_drafts=3, num_accepted=1)  # pos 1 kept, pos 2 rejected, pos 3 unseen
    assert rates == [0.75, 0.25, 0.5]
    # position 2's first observation starts from what new requests were given for it
    # (position 1's rate, 0.75), not from initial_rate
    assert t.prior == [0.75, 0.375, 0.5]
    t.observe_probe(rates, accepted=False)
    assert rates[0] == pytest.approx(0.375)
    # a new request starts from the global prior; position 3, never verified, inherits
    # position 2's rate
    assert t.new_rates() == [0.375, 0.375, 0.375]
    with pytest.raises(ValueError, match="bad observation"):
        t.observe(rates, num_drafts=2, num_accepted=3)


def test_unreached_positions_follow_the_deepest_reached_one():
    t = AcceptanceTracker(4, initial_rate=0.6, global_weight=0.5)
    rates = t.new_rates()
    for _ in range(6):  # k = 2 every step, both drafts accepted: positions 3, 4 unseen
        t.observe(rates, num_drafts=2, num_accepted=2)
    fresh = t.new_rates()
    assert fresh[1] > 0.95 and fresh[2] == fresh[3] == fresh[1]  # not stuck at 0.6


def test_global_prior_is_a_running_mean_then_an_ewma():
    t = AcceptanceTracker(1, initial_rate=0.6, global_weight=0.01, prior_strength=4)
    rates = t.new_rates()
    for x in (1, 0, 1, 1, 1, 1):  # mean of 0.6 x 4 pseudo-observations and these
        t.observe(rates, 1, x)
    assert t.prior[0] == pytest.approx((0.6 * 4 + 5) / 10)
    for x in [0] * 1000 + [1] * 100:  # then the weight stays at 0.01, not 1/n: it
        t.observe(rates, 1, x)  # follows a change (a running mean would be at 0.09)
    assert t.prior[0] == pytest.approx(1 - 0.99**100, abs=1e-3)
    with pytest.raises(ValueError, match="prior_strength"):
        AcceptanceTracker(2, prior_strength=-1)


def test_all_kept_with_a_known_next_draft_observes_one_position_more():
    t = AcceptanceTracker(4, initial_rate=0.5, request_weight=0.5, global_weight=0.5)
    rates = t.new_rates()
    t.observe(rates, num_drafts=2, num_accepted=2, next_accepted=True)
    assert rates == [0.75, 0.75, 0.75, 0.5]  # position 3 seen through the bonus token
    t.observe(rates, num_drafts=2, num_accepted=1, next_accepted=True)  # not all kept:
    assert rates[2] == 0.75  # draft 3 would have followed a rejected one, nothing seen
    t.observe(rates, num_drafts=4, num_accepted=4, next_accepted=False)  # no position 5
    assert rates == [0.9375, 0.6875, 0.875, 0.75]


def test_online_linear_model_recovers_coefficients_and_forgets():
    rng = random.Random(1)
    m = OnlineLinearModel([1.0, 64.0, 4096.0], decay=0.9)

    def truth(x, c):
        return c[0] + c[1] * x[1] + c[2] * x[2]

    for coef in ([3.0, 0.05, 0.001], [1.0, 0.2, 0.0]):  # the second replaces the first
        for _ in range(200):
            x = [1.0, rng.randint(1, 300), rng.randint(10, 20000)]
            m.observe(x, truth(x, coef) + rng.gauss(0, 0.01))
        assert m.coef == pytest.approx(coef, abs=0.02)


def test_unexcited_direction_goes_to_the_constant():
    """One sequence decoding alone: every step has 1 token; the ridge must not make
    'per token' carry the step's cost (that would stop speculation forever)."""
    m = StepCostModel()
    for _ in range(50):
        m.observe(StepFeatures(1, 100, 1, 1), target_time_s=0.004, draft_time_s=0.0008)
    costs = m.marginal(StepFeatures(1, 100, 0, 0), catch_up_tokens=1)
    assert costs.base_time == pytest.approx(0.004, rel=0.02)
    assert costs.per_draft_token < 0.0001
    assert costs.draft_catch_up == pytest.approx(0.0008, rel=0.02)
    assert costs.per_draft_row < 0.00002


def test_a_feature_with_its_own_ridge_stays_at_its_prior_until_excited():
    m = OnlineLinearModel([1.0, 64.0], prior=[0.0, 0.5], ridge=[1e-3, 10.0])
    for _ in range(60):
        m.observe([1.0, 0.0], 2.0)  # the second feature never varies from 0
    assert m.coef == pytest.approx([2.0, 0.5], abs=1e-3)
    with pytest.raises(ValueError):
        OnlineLinearModel([1.0, 64.0], ridge=[1e-3])


def dear_drafts(f: StepFeatures) -> float:
    """Step seconds where a verified draft costs 0.1 ms more than any other token."""
    return 0.005 + 0.0001 * f.batched_tokens + 0.0001 * f.verify_tokens


def observe_steps(m: StepCostModel, rng: random.Random, n: int, drafts, chunks, noise=0.0):
    """n steps of 8-64 decodes at mixed lengths: drafts(batch) verified drafts and
    chunks() prompt-chunk tokens each, timed by dear_drafts (times 1 +- noise)."""
    for _ in range(n):
        batch = rng.randint(8, 64)
        d, chunk = drafts(batch), chunks()
        context = batch * rng.randint(50, 500)
        f = StepFeatures(batch + d + chunk, context, 0, 0, verify_tokens=d)
        m.observe(f, dear_drafts(f) * rng.uniform(1 - noise, 1 + noise), 0.0)


def test_verified_drafts_dearer_than_other_tokens_are_learned_and_the_base_kept():
    """Decodes at varying batch sizes, prompt chunks and speculating steps. One shared
    per-token term would sit between the two costs and misplace the k = 0 step; with
    the verified-draft term both come out right."""
    rng = random.Random(2)
    m = StepCostModel()
    observe_steps(m, rng, 300, lambda b: rng.choice([0, 0, b, 2 * b]),
                  lambda: rng.choice([0, 0, 0, rng.randint(16, 256)]), noise=0.03)  # fmt: skip
    base = StepFeatures(64, 6400, 0, 0)
    costs = m.marginal(base, None)
    assert costs.base_time == pytest.approx(dear_drafts(base), rel=0.05)
    assert costs.per_draft_token == pytest.approx(0.0002, rel=0.15)


def test_the_verified_draft_cost_is_kept_while_nobody_speculates():
    """Learned from windows, then hundreds of steps without drafts: the old steps'
    weight decays, and the verified-draft term must not fall back to 0 with it."""
    rng = random.Random(3)
    m = StepCostModel()
    observe_steps(m, rng, 200, lambda b: rng.choice([0, b, 2 * b]), lambda: 0)
    learned = m.marginal(StepFeatures(64, 6400, 0, 0), None).per_draft_token
    assert learned == pytest.approx(0.0002, rel=0.15)
    observe_steps(m, rng, 500, lambda b: 0, lambda: 0)
    kept = m.marginal(StepFeatures(64, 6400, 0, 0), None).per_draft_token
    assert kept == pytest.approx(learned, rel=0.15)


def test_the_first_draft_forward_is_priced_apart_when_depths_vary():
    """Draft steps cost 0.2 ms + 0.6 ms a forward + 0.01 ms a token. Over depths 1..4
    the fit prices a further draft position at 0.6 ms (one slope without the first
    forward's extra would say ~0.7); where every step has depth 1 the two cannot be told
    apart, and a further position is charged the whole forward, 0.8 ms."""
    varied, flat = StepCostModel(), StepCostModel()
    for i in range(200):
        depth, tokens = 1 + i % 4, 4 + i % 7
        draft_s = 0.0002 + 0.0006 * depth + 0.00001 * (tokens + depth - 1)
        varied.observe(StepFeatures(8, 800, depth, tokens + depth - 1), 0.005, draft_s)
        flat.observe(StepFeatures(8, 800, 1, tokens), 0.005, 0.0008 + 0.00001 * tokens)
    base = StepFeatures(8, 800, 0, 0)
    costs = varied.marginal(base, catch_up_tokens=8)
    assert costs.per_draft_forward == pytest.approx(0.0006, rel=0.05)
    assert costs.draft_catch_up == pytest.approx(0.0002 + 0.0006 + 0.00008, rel=0.05)
    costs = flat.marginal(base, catch_up_tokens=8)
    assert costs.per_draft_forward == pytest.approx(0.0008, rel=0.05)
    assert costs.draft_catch_up == pytest.approx(0.0008 + 0.00008, rel=0.05)

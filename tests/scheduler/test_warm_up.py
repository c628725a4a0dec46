"""The start-up warm-up: synthetic steps that calibrate the cost model and leave
nothing else behind."""

from __future__ import annotations

import pytest
from scheduler_fakes import FakeExecutor, greedy, make_core, run_to_end, tokens_of
from spec_fakes import SpecFakeExecutor, reference

from tandem.engine.plan import StepPlan
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest
from tandem.scheduler.spec_control import AcceptanceTracker

C0, C_TOK, D_FWD, D_TOK = 0.004, 0.0001, 0.0008, 0.00001


def linear_cost(plan: StepPlan) -> tuple[float, float]:
    """Exactly the cost model's form: target c0 + c_tok * tokens (context free), draft
    d_fwd per forward + d_tok per token, the draft forwards as the worker runs them
    (but for the backlog a catch-up forward also computes after k = 0 steps)."""
    depth = max((s.num_draft for s in plan.seqs), default=0)
    if not depth:
        return C0 + C_TOK * plan.num_tokens, 0.0
    catch_up = sum(len(s.token_ids) for s in plan.seqs)
    draft_tokens = catch_up + sum(max(s.num_draft - 1, 0) for s in plan.seqs)
    return C0 + C_TOK * plan.num_tokens, D_FWD * depth + D_TOK * draft_tokens


def spec_core(method: str, ex: SpecFakeExecutor, **config) -> EngineCore:
    spec = SpeculativeConfig(speculative_method=method, num_speculative_tokens=4)
    return EngineCore(SchedulerConfig(**config), ex, spec=spec, step_timer=ex.timer)


def continue_pattern(ctx: list[int]) -> int:
    """A fake model that continues the warm-up prompt's 8-token pattern (as language
    models copy a repeated pattern), so n-gram lookup has drafts at every depth."""
    return ctx[-8]


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_warm_up_calibrates_and_leaves_nothing_behind(method):
    ex = SpecFakeExecutor(
        num_blocks=256,
        draft_model=method == "draft",
        step_cost_s=linear_cost,
        next_token=continue_pattern,
    )
    core = spec_core(method, ex)
    planner = core.scheduler.spec
    assert core.warm_up() > 0

    depths = {max(s.num_draft for s in p.seqs) for p in ex.plans}
    assert depths == {0, 1, 2, 3, 4}, depths  # every k was run
    assert {len(p.seqs) for p in ex.plans} == {1, 4}
    costs = planner.costs
    assert costs.target.num_observations >= 16  # enough for outlier clipping to apply
    c0, c_tok, _, c_ctx = costs.target.coef
    assert c0 == pytest.approx(C0, rel=0.05) and c_tok == pytest.approx(C_TOK, rel=0.2)
    if method == "draft":
        # (d_tok is weakly excited: a few tokens a forward; the predictions are what count)
        for depth, tokens in [(1, 1), (4, 4), (4, 16), (2, 8)]:
            want = D_FWD * depth + D_TOK * tokens
            assert costs.draft.predict([1, depth, tokens]) == pytest.approx(want, rel=0.05)

    # nothing else learned or counted; the pool is as new
    assert planner.forced_k is None
    assert planner.tracker.prior == AcceptanceTracker(4).prior
    stats = core.stats()
    assert not any(stats.scheduler.spec.k_histogram) and stats.scheduler.spec.num_drafts == 0
    assert stats.steps.num_steps == 0
    kv = stats.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks and kv.num_cached_blocks == 0
    assert kv.prefix_query_tokens == 0 and kv.num_evictions == 0
    assert not core.has_unfinished()

    # a real request afterwards: exact output, the warm-up's mirrors freed on the worker
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    outs = run_to_end(core, [GenerateRequest("real", prompt, greedy(30))])
    assert tokens_of(outs["real"]) == reference(prompt, 30, continue_pattern)
    assert len(ex.seqs) <= 1  # (the real request's, its end not yet sent)


def test_warm_up_without_speculation_and_skips():
    core, ex = make_core(FakeExecutor(num_blocks=64))
    assert core.warm_up() > 0
    assert ex.plans and core.stats().steps.num_steps == 0
    assert core.stats().scheduler.kv.num_free_blocks == 64

    tiny, ex = make_core(FakeExecutor(num_blocks=64, max_model_len=10))
    assert tiny.warm_up() == 0 and not ex.plans  # no room for a synthetic prompt

    small_pool, ex = make_core(FakeExecutor(num_blocks=8))
    assert small_pool.warm_up() == 0 and not ex.plans  # it would take half the pool

    busy, _ = make_core()
    busy.add_request(GenerateRequest("r", [1, 2, 3], greedy(4)))
    with pytest.raises(RuntimeError, match="before any request"):
        busy.warm_up()

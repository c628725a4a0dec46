"""The scheduler's side of speculative decoding: k per decode, drafts, statistics.

Each step, after decodes, prefill chunks and admissions are planned, `plan_drafts`
gives each decoding request its k (0..K) from what the step's token budget has left:
the goodput controller's choice (`spec_control.choose_k`), K for the fixed policy.
A request with k drafts gets blocks for its k+1-token window, and with the n-gram
proposer its drafts travel in the plan; the draft model proposes in the engine.
Drafts never preempt: when blocks are short, k shrinks.

After the step, `on_result` feeds each request's acceptance statistics (drafts kept,
or at k = 0 a probe) and `on_step` fits the step-cost model to the measured times.

The draft model runs only in steps where someone speculates (see engine/proposers.py),
so the planner tracks how far each request's draft KV got (`RequestSpec.
draft_computed`): the catch-up it would cost is part of the step's predicted time. The
choice of k weighs the steady-state catch-up (this step's tokens), the backlog being
paid once. While nobody speculates, no probe observes acceptance either; so one request
gets one exploring draft when that costs little (`_explore`), and the draft catches up
that request alone.

With the draft model the controller's bar is higher than the step's predicted goodput:
it compares the goodput of the step's decode work (a prompt chunk in the same step costs
the same whatever k is), a choice to speculate must beat k = 0 by more than the cost
model's recent relative error (`_choose`), and the cost model prices a verified
draft apart from other tokens (cost_model.py). At 64 requests on the built-in pair on
CPU, in A/B rounds against the plain rules, these took the draft model from 0.86-0.89x
of no speculation to 0.96-1.01x, and from 1.46x to 1.56x at one request; whole-table
runs later (with the start-up heap frozen, benchmarks/RESULTS.md) measured 0.94-0.97x
at 64 offline and 0.96x over HTTP, the rest being this planner's own per-step cost
(~0.3 ms of a 13 ms step at 64 requests) and exploring steps. The n-gram proposer keeps the
plain rules: with these it measured 4-8% slower at 64 requests in three of four A/B
rounds (its windows are longer; a window's cost probably has a per-sequence part that
one per-token term charges to long windows too).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tandem.engine.plan import SeqPlan, SeqResult, StepPlan, StepResult
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.cost_model import StepCostModel, StepFeatures
from tandem.scheduler.kv_blocks import BlockPool
from tandem.scheduler.ngram import NgramIndex
from tandem.scheduler.request import Request, RequestStatus
from tandem.scheduler.spec_control import (
    AcceptanceTracker,
    Candidate,
    RequestSpec,
    choose_k,
    fit_budget,
)
from tandem.scheduler.stats import SpecStats

EXPLORE_FREE_LOSS = 0.05  # predicted goodput an exploring step may always give up
EXPLORE_EVERY = 32  # steps without speculation (draft model) before a dearer one
EXPLORE_MAX_LOSS = 0.2  # most predicted goodput that one may give up
PREDICTION_ERROR_START = 0.05  # relative step-time error assumed before any is measured
PREDICTION_ERROR_WEIGHT = 0.05  # EWMA weight of one step's error


@dataclass(slots=True)
class _Planned:
    """What plan_drafts decided for a step, for on_step to learn from."""

    step_id: int
    features: StepFeatures  # the step as planned (drafts and catch-up included)
    predicted_s: float | None  # predicted step seconds (None before any measurement)


class SpecPlanner:
    """Chooses k, proposes n-gram drafts, and learns acceptance and step costs."""

    def __init__(self, spec: SpeculativeConfig, pool: BlockPool, max_len: int) -> None:
        """max_len: the most tokens a sequence may hold (prompt + outputs)."""
        if not spec.enabled:
            raise ValueError("SpecPlanner needs a proposer and a policy other than off")
        self.spec = spec
        self.max_k = spec.num_speculative_tokens
        self.pool = pool
        self.max_len = max_len
        self.tracker = AcceptanceTracker(self.max_k)
        self.costs = StepCostModel()
        self._lock = threading.Lock()  # guards _stats against readers on other threads
        self.reset_stats()
        self._planned: _Planned | None = None  # the step planned last
        self._idle_steps = 0  # steps since the draft model last ran (draft method)
        self.prediction_error = PREDICTION_ERROR_START  # EWMA of |measured / predicted - 1|
        self.forced_k: int | None = None  # set by the start-up warm-up (scheduler/
        # warm_up.py): every decode gets this k, and its steps teach the cost model only

    def reset_stats(self) -> None:
        """Zero the counters (at start, and after the warm-up; the cost model keeps
        what it learned)."""
        with self._lock:
            self._stats = SpecStats(
                accepted_per_pos=[0] * self.max_k, k_histogram=[0] * (self.max_k + 1)
            )

    # ---- planning ------------------------------------------------------------------

    def plan_drafts(
        self,
        step_id: int,
        seqs: dict[int, SeqPlan],
        decodes: list[Request],
        budget: int,
        by_seq: dict[int, Request],
    ) -> int:
        """Set num_draft (and n-gram drafts, and blocks) on the plans of `decodes`;
        returns the draft tokens used, at most `budget`. by_seq: every live request."""
        plans = list(seqs.values())
        for sp in plans:
            if sp.new is not None:  # a fresh worker mirror: its draft KV starts empty
                self._state(by_seq[sp.seq_id]).draft_computed = 0
        chosen: list[tuple[Request, SeqPlan]] = []
        cands: list[Candidate] = []
        left = 0  # tokens the candidates may still produce, in all
        for req in decodes:
            sp = seqs.get(req.seq_id)
            if sp is None or req.status != RequestStatus.RUNNING or not sp.sample:
                continue
            state = self._state(req)
            tokens_left = req.sampling.max_tokens - req.num_output_tokens
            max_k = self._max_k(req, tokens_left)
            if state.ngram is not None:
                state.proposal = state.ngram.propose(req.token_ids, max_k)
                max_k = len(state.proposal)
            chosen.append((req, sp))
            cands.append(Candidate(max_k, state.rates))
            left += tokens_left
        catch_up = self._catch_up_tokens(plans, by_seq)
        horizon = max(1.0, left / max(len(cands), 1))  # steps the requests still run, about
        ks, exploring = self._choose(cands, chosen, plans, catch_up, budget, horizon)
        used = sum(self._apply_k(req, sp, k) for (req, sp), k in zip(chosen, ks, strict=True) if k)
        if exploring:  # the draft catches up the explored sequence only
            for sp in plans:
                sp.draft_catch_up = sp.num_draft > 0
            catch_up = self._catch_up_tokens([sp for sp in plans if sp.num_draft], by_seq)
        if self.forced_k is None:
            with self._lock:
                for sp in (sp for _, sp in chosen):
                    self._stats.k_histogram[sp.num_draft] += 1
        features = self._features(plans, catch_up)
        predicted = self.costs.predict(features) if self.costs.ready else None
        self._planned = _Planned(step_id, features, predicted)
        return used

    def _state(self, req: Request) -> RequestSpec:
        if req.spec is None:
            ngram = None
            if self.spec.uses_ngram:
                ngram = NgramIndex(self.spec.prompt_lookup_min, self.spec.prompt_lookup_max)
            req.spec = RequestSpec(self.tracker.new_rates(), ngram)
        return req.spec

    def _max_k(self, req: Request, tokens_left: int) -> int:
        """Drafts that can still be useful: K, the request's cap, and one fewer than
        the tokens it may still produce (the last is always the target's own).
        tokens_left: its max_tokens less its outputs so far."""
        left = min(tokens_left, self.max_len - len(req.token_ids))
        cap = self.max_k if req.max_draft_tokens is None else min(self.max_k, req.max_draft_tokens)
        return max(0, min(cap, left - 1))

    def _catch_up_tokens(self, plans: list[SeqPlan], by_seq: dict[int, Request]) -> int | None:
        """Tokens the draft model's catch-up forward computes if it runs this step and
        catches up these sequences (backlog included); None without a draft model."""
        if not self.spec.uses_draft_model:
            return None
        return sum(self._lag(by_seq[sp.seq_id], sp) for sp in plans)

    def _lag(self, req: Request, sp: SeqPlan) -> int:
        """Tokens the draft's catch-up computes for req this step: its backlog and sp's."""
        have = min(self._state(req).draft_computed, sp.start_pos)
        return sp.start_pos + len(sp.token_ids) - have

    def _choose(
        self,
        cands: list[Candidate],
        chosen: list[tuple[Request, SeqPlan]],
        plans: list[SeqPlan],
        catch_up: int | None,
        budget: int,
        horizon: float,
    ) -> tuple[list[int], bool]:
        """k per candidate (chosen: their requests and plans), and whether the step
        explores (`_explore`). catch_up: the draft's catch-up tokens if it ran for
        every sequence (backlog included), None for n-gram; horizon: steps the
        candidates still have, about."""
        zeros = [0] * len(cands)
        if self.forced_k is not None:
            return fit_budget([min(self.forced_k, c.max_k) for c in cands], budget), False
        if self.spec.speculation_policy == "fixed":
            return fit_budget([c.max_k for c in cands], budget), False
        if not self.costs.ready or not cands:
            return zeros, False  # nothing measured yet: the first step learns
        # With the draft model the ratio weighs decode work only: a prompt chunk in the
        # same step costs what it costs whatever k is, and counting its time in the
        # step's base lowers the bar that speculation must clear (at 64 requests, where
        # most steps carry a new request's chunk, speculation then won steps in which it
        # lost time)
        draft_model = catch_up is not None
        decoding = [sp for sp in plans if len(sp.token_ids) == 1 or not draft_model]
        base = self._features(decoding, None)
        base_tokens = sum(1 for sp in decoding if sp.sample)
        if not base_tokens:
            return zeros, False
        # The choice weighs the catch-up a speculating step costs in steady state (this
        # step's tokens) plus the backlog of steps in which the draft rested spread over
        # the steps the requests still run: it is paid once, and charging it all to one
        # step would keep speculation off for good once the backlog grew.
        steady = None
        if catch_up is not None:
            step_tokens = sum(len(sp.token_ids) for sp in plans)
            steady = step_tokens + max(catch_up - step_tokens, 0) / horizon
        costs = self.costs.marginal(base, steady)
        # With the draft model a choice to speculate must beat k = 0 by more than the
        # cost model's recent relative error (EWMA of |measured / predicted - 1| over
        # whole steps): a choice made on a prediction is biased towards where the
        # prediction erred. At 64 requests the steps the controller chose to speculate
        # in were those whose k = 0 time the fit had put high (18.4 ms predicted there,
        # 16.0 measured in the others), and a gain of 10% inside that noise lost time.
        margin = self.prediction_error if draft_model else 0.0
        ks = choose_k(cands, costs, base_tokens, budget, margin)
        if any(ks) or not draft_model or budget <= 0:
            return ks, False
        best = self._explore(cands, chosen, base, base_tokens)
        return (
            (zeros, False) if best is None else ([int(i == best) for i in range(len(cands))], True)
        )

    def _explore(
        self,
        cands: list[Candidate],
        chosen: list[tuple[Request, SeqPlan]],
        base: StepFeatures,
        base_tokens: int,
    ) -> int | None:
        """While nobody speculates the draft model does not run, and acceptance is not
        observed. So give one draft to the most promising request (returns its index)
        when that costs at most EXPLORE_FREE_LOSS of the step's predicted goodput, or
        after EXPLORE_EVERY idle steps at most EXPLORE_MAX_LOSS; None: no exploring.
        The draft then catches up that request only (`SeqPlan.draft_catch_up`): its
        backlog is what exploring costs. (Catching up every request of the step, as
        a chosen speculation does, made each exploring step at 64 requests a draft
        prefill over 64 backlogs; it was then too dear to take, and nothing was
        learned, or taken, and cost more than the goodput it protected.)"""
        self._idle_steps += 1
        best = max(range(len(cands)), key=lambda i: (cands[i].max_k > 0, cands[i].rates[0]))
        if cands[best].max_k == 0:
            return None
        costs = self.costs.marginal(base, self._lag(*chosen[best]))
        # spec_control.predicted_goodput of one draft for `best` against none, in O(1)
        keep = base_tokens / costs.base_time
        gain = cands[best].rates[0]
        extra = costs.per_draft_token + costs.draft_catch_up
        loss = EXPLORE_MAX_LOSS if self._idle_steps >= EXPLORE_EVERY else EXPLORE_FREE_LOSS
        if (base_tokens + gain) / (costs.base_time + extra) >= (1 - loss) * keep:
            return best
        return None

    def _apply_k(self, req: Request, sp: SeqPlan, k: int) -> int:
        """Give req k drafts if blocks allow (fewer if not); returns the k given."""
        if k <= 0:
            return 0
        have = len(req.block_ids)
        room = (have + self.pool.num_free_blocks) * self.pool.block_size
        k = min(k, room - (req.num_computed_tokens + 1))
        if k <= 0:
            return 0
        window_end = req.num_computed_tokens + 1 + k  # positions the window fills
        new_blocks = self.pool.allocate(max(0, self.pool.blocks_for(window_end) - have))
        req.block_ids.extend(new_blocks)
        sp.new_block_ids.extend(new_blocks)
        sp.num_draft = k
        if req.spec is not None and req.spec.proposal is not None:
            sp.draft_token_ids = req.spec.proposal[:k]
        return k

    def _features(self, plans: list[SeqPlan], catch_up: int | None) -> StepFeatures:
        """The cost model's features of a plan (drafts included as set so far);
        catch_up: the draft's catch-up tokens (None: no draft model)."""
        tokens = context = drafts = depth = speculating = 0
        for s in plans:
            tokens += len(s.token_ids)
            context += s.start_pos + len(s.token_ids) + s.num_draft
            if s.num_draft:
                drafts += s.num_draft
                depth = max(depth, s.num_draft)
                speculating += 1
        runs = catch_up is not None and depth > 0  # the draft model runs this step
        return StepFeatures(
            batched_tokens=tokens + drafts,
            context_tokens=context,
            draft_forwards=depth if runs else 0,
            draft_tokens=(catch_up or 0) + drafts - speculating if runs else 0,
            verify_tokens=drafts if self.spec.uses_draft_model else 0,
        )

    # ---- learning ------------------------------------------------------------------

    def on_result(self, req: Request, sp: SeqPlan, res: SeqResult | None) -> None:
        """Acceptance statistics from one sequence's result."""
        state = req.spec
        if state is None or res is None or not res.token_ids:
            return
        if self.forced_k is not None:  # warm-up: synthetic text says nothing of acceptance
            state.proposal = None
            return
        k, a = sp.num_draft, res.num_accepted_drafts
        if res.lookback_accepted is not None and 0 < state.all_kept < self.max_k:
            # the last step kept all its drafts; would one more have been kept?
            self.tracker.observe_probe(state.rates, res.lookback_accepted, state.all_kept + 1)
        state.all_kept = k if 0 < k == a else 0
        if k:
            # an n-gram proposal longer than k, all k kept: the bonus token tells whether
            # draft k+1 would have been kept too (else a low rate at a position the
            # controller stopped reaching would never be seen again)
            prop, nxt = state.proposal, None
            if prop is not None and len(prop) > k == a and len(res.token_ids) > k:
                nxt = prop[k] == res.token_ids[k]
            self.tracker.observe(state.rates, k, a, nxt)
            req.num_draft_tokens += k
            req.num_accepted_draft_tokens += a
            with self._lock:
                st = self._stats
                st.num_drafts += 1
                st.num_draft_tokens += k
                st.num_accepted_tokens += a
                for j in range(a):
                    st.accepted_per_pos[j] += 1
        elif res.probe_accepted is not None:
            self.tracker.observe_probe(state.rates, res.probe_accepted)
        elif state.proposal:
            self.tracker.observe_probe(state.rates, state.proposal[0] == res.token_ids[0])
        state.proposal = None

    def on_step(
        self, plan: StepPlan, result: StepResult, step_time_s: float, by_seq: dict[int, Request]
    ) -> None:
        """After update(): fit the cost model to the step's measured time (the draft's
        as the executor measured it, the rest of the step's wall time as the target's),
        and note how far the draft model's KV got."""
        planned, self._planned = self._planned, None
        if planned is None or planned.step_id != plan.step_id:
            return  # not planned by us (cannot happen in a core; a safety net)
        self._track_draft_kv(plan, result, by_seq)
        target_s = max(step_time_s - result.draft_time_s, 0.0)
        self.costs.observe(planned.features, target_s, result.draft_time_s)
        if planned.predicted_s is not None and self.forced_k is None:
            err = min(abs(step_time_s / max(planned.predicted_s, 1e-9) - 1.0), 1.0)
            self.prediction_error += PREDICTION_ERROR_WEIGHT * (err - self.prediction_error)
            with self._lock:
                self._stats.predicted_step_time_s += planned.predicted_s
                self._stats.measured_step_time_s += step_time_s
                self._stats.num_predicted_steps += 1

    def _track_draft_kv(self, plan: StepPlan, result: StepResult, by_seq) -> None:
        """Where each sequence's draft KV ends after a step in which the draft model
        ran (it caught up every sequence the plan did not leave behind; an
        all-accepted window's last draft it never saw); unchanged after a step in which
        it did not."""
        if not self.spec.uses_draft_model or not any(sp.num_draft for sp in plan.seqs):
            return
        self._idle_steps = 0
        accepted = {r.seq_id: r.num_accepted_drafts for r in result.seqs}
        for sp in plan.seqs:
            if not (sp.num_draft or sp.draft_catch_up):
                continue
            req = by_seq.get(sp.seq_id)
            if req is not None and req.spec is not None:
                a = accepted.get(sp.seq_id, 0)
                end = sp.start_pos + len(sp.token_ids)
                req.spec.draft_computed = end + a - int(0 < sp.num_draft == a)

    def stats(self) -> SpecStats:
        """A copy of the counters (thread-safe)."""
        with self._lock:
            s = self._stats
            return SpecStats(
                s.num_drafts,
                s.num_draft_tokens,
                s.num_accepted_tokens,
                list(s.accepted_per_pos),
                list(s.k_histogram),
                s.predicted_step_time_s,
                s.measured_step_time_s,
                s.num_predicted_steps,
            )

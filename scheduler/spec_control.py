"""Speculation-length control: acceptance statistics and the goodput-maximising k.

Acceptance. For each request and draft position j (1-based), rate_j estimates
P(draft j accepted | drafts 1..j-1 accepted): an EWMA of what verification observed,
started from a global prior (over all requests: a running mean, then an EWMA) at cold
start. A step with k drafts of which a were accepted observes positions
1..min(a+1, k): accepted up to a, rejected at a+1 (with n-gram, position k+1 too when
all k were kept: the proposal's next token against the bonus token). While a request
runs with k = 0, a probe (the draft it would have got, compared with the token
sampled) keeps position 1 up to date: every step for n-gram, in the steps where the
draft model runs for a draft model. After a step that kept all k drafts, position k + 1
is observed too: n-gram compares its proposal's next token with the bonus token, and
the draft model's next catch-up forward samples the draft it would have proposed there
(a look-back), so a position the controller stopped reaching is still seen.

Goodput. Let P_i(j) = rate_1 * .. * rate_j: the chance that request i's first j
drafts are all accepted. With k_i drafts it expects E_i(k_i) = 1 + sum_{j<=k_i} P_i(j)
tokens. With `MarginalCosts` and depth m = max_i k_i the predicted step time is

    T(k) = base + c_tok * sum_i k_i + F(m) + c_row * sum_i max(k_i - 1, 0)
    F(0) = 0,  F(m) = catch_up + c_fwd * (m - 1)

(a draft model runs only in steps where someone speculates: its catch-up forward
gives every speculating request its draft 1, and each further draft position is one
more draft forward over the requests that reach it; for n-gram all draft costs are
0). The controller picks k_i in [0, max_k_i] with sum_i k_i <= budget maximising
(N0 + sum_i (E_i(k_i) - 1)) / T(k), N0 = tokens the step yields with k = 0.

`choose_k` solves this exactly. For each depth m, the step overhead F(m) is fixed
(it only grows with m) and Dinkelbach's method reduces the ratio to a sequence of
problems max N(k) - lam * T(k), which separate per request into increments of value
P_i(j) - lam * (c_tok + [j >= 2] c_row); these are non-increasing in j, so the best
choice under the budget is the largest positive increments, taken greedily. Then the
best depth wins. Tests compare it with brute force.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.scheduler.cost_model import MarginalCosts
from tandem.scheduler.ngram import NgramIndex


@dataclass(slots=True)
class RequestSpec:
    """A request's speculation state (scheduler-owned, survives preemption)."""

    rates: list[float]  # acceptance rate per draft position, index 0 = position 1
    ngram: NgramIndex | None = None  # its index when the n-gram proposer is on
    proposal: list[int] | None = None  # n-gram drafts proposed this step; at k = 0 the
    # first is compared with the token sampled (a probe)
    draft_computed: int = 0  # leading tokens whose draft-model KV the worker holds
    # (as far as the scheduler can tell; it sizes the draft's catch-up forward)
    all_kept: int = 0  # k of its last step if all k drafts were kept, else 0 (a draft
    # model's look-back in the next step then observes position k + 1)


class AcceptanceTracker:
    """Per-position acceptance EWMAs: one global prior, one per request."""

    def __init__(
        self,
        max_k: int,
        initial_rate: float = 0.6,
        request_weight: float = 0.15,
        global_weight: float = 0.003,
        prior_strength: float = 5.0,
    ) -> None:
        """initial_rate: the prior before anything is observed; *_weight: the EWMA
        weight of one new observation for a request, and for the global prior, which
        starts as a running mean: its n-th observation at a position weighs
        max(global_weight, 1 / (n + prior_strength)), initial_rate counting as
        prior_strength observations. (The global prior sees every request's
        verifications: at 64 concurrent requests a weight of 0.02 per observation
        remembered less than one step, and its swings moved every request's k.)"""
        if not 0 < initial_rate <= 1 or not 0 < request_weight <= 1 or not 0 < global_weight <= 1:
            raise ValueError("rates and weights must be in (0, 1]")
        if prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
        self.max_k = max_k
        self.prior = [initial_rate] * max_k
        self.request_weight = request_weight
        self.global_weight = global_weight
        self.prior_strength = prior_strength
        self.observed = [False] * max_k  # whether position j was ever verified
        self.count = [0] * max_k  # verifications seen at position j

    def new_rates(self) -> list[float]:
        """A new request's rates: the global prior now, where a position never verified
        yet takes the rate of the one before it. (Position j is only observed when some
        step gives k >= j; without this, a deep position would keep initial_rate for
        good once the controller stops reaching it, however well drafts are accepted
        — conditional acceptance tends to hold or rise with depth.)"""
        rates = list(self.prior)
        for j in range(1, self.max_k):
            if not self.observed[j]:
                rates[j] = rates[j - 1]
        return rates

    def observe(
        self,
        rates: list[float],
        num_drafts: int,
        num_accepted: int,
        next_accepted: bool | None = None,
    ) -> None:
        """A verification: num_accepted of num_drafts drafts were kept. next_accepted:
        when all were kept, whether one more draft would have been (the n-gram
        proposal's next token against the bonus token), None if unknown."""
        if not 0 <= num_accepted <= num_drafts <= self.max_k:
            raise ValueError(f"bad observation: {num_accepted} of {num_drafts} accepted")
        for j in range(min(num_accepted + 1, num_drafts)):
            self._update(rates, j, 1.0 if j < num_accepted else 0.0)
        if next_accepted is not None and num_accepted == num_drafts < self.max_k:
            self._update(rates, num_drafts, 1.0 if next_accepted else 0.0)

    def observe_probe(self, rates: list[float], accepted: bool, position: int = 1) -> None:
        """A probe: would draft `position` have been accepted (drafts before it were)?
        Position 1 at a k = 0 step; k + 1 after a step that kept all its k drafts."""
        if not 1 <= position <= self.max_k:
            raise ValueError(f"probe position {position} not in 1..{self.max_k}")
        self._update(rates, position - 1, 1.0 if accepted else 0.0)

    def _update(self, rates: list[float], j: int, x: float) -> None:
        w, g = self.request_weight, self.global_weight
        if not self.observed[j]:  # the first verification here starts from the rate
            self.prior[j] = self.new_rates()[j]  # new requests were given for it
            self.observed[j] = True
        self.count[j] += 1
        g = max(g, 1.0 / (self.count[j] + self.prior_strength))
        rates[j] += w * (x - rates[j])
        self.prior[j] += g * (x - self.prior[j])


def expected_tokens(rates: list[float], k: int) -> float:
    """1 + sum_{j<=k} P(first j drafts accepted)."""
    total, p = 1.0, 1.0
    for r in rates[:k]:
        p *= r
        total += p
    return total


@dataclass(slots=True)
class Candidate:
    """A decoding request the controller may give drafts this step."""

    max_k: int  # most drafts it may get now (K, its own cap, drafts available, tokens left)
    rates: list[float]  # acceptance per draft position (at least max_k entries)


def predicted_goodput(
    ks: list[int], cands: list[Candidate], costs: MarginalCosts, base_tokens: float
) -> float:
    """Expected tokens per predicted second for drafts ks (the module's formula)."""
    tokens = base_tokens + sum(
        expected_tokens(c.rates, k) - 1 for c, k in zip(cands, ks, strict=True)
    )
    depth = max(ks, default=0)
    time = costs.base_time + costs.per_draft_token * sum(ks)
    if depth:
        time += costs.draft_catch_up + costs.per_draft_forward * (depth - 1)
        time += costs.per_draft_row * sum(max(k - 1, 0) for k in ks)
    return tokens / time


def choose_k(
    cands: list[Candidate],
    costs: MarginalCosts,
    base_tokens: float,
    budget: int,
    margin: float = 0.0,
) -> list[int]:
    """Drafts per candidate maximising `predicted_goodput` within the token budget.
    margin: k = 0 everywhere unless the best choice beats k = 0's goodput by the
    factor 1 + margin (the draft model's planner passes its cost model's recent error:
    a choice made on a prediction is biased towards where the prediction erred), and
    where a bound shows no choice can, at once, without the search."""
    best = [0] * len(cands)
    top = max((c.rates[0] for c in cands if c.max_k > 0), default=None)
    if top is None or budget <= 0:
        return best
    best_g = base_tokens / costs.base_time  # = predicted_goodput(best, ...)
    zero_g = best_g
    # Fast exits (high load): no increment pays, even before any per-depth overhead;
    # or no depth's best drafts pay their depth's overhead
    floor = best_g * (1 + margin)
    if top <= floor * costs.per_draft_token or not _any_depth_pays(cands, costs, floor):
        return best
    probs = [_cumulative(c) for c in cands]
    goodput = _goodput_of(probs, costs, base_tokens)
    for depth in range(1, min(max(len(p) for p in probs), budget) + 1):
        lam, ks = best_g, None
        resp = _best_response(probs, depth, lam, costs, budget)
        if max(resp, default=0) < depth:
            # no draft at this depth pays even at the best goodput so far; deeper
            # positions are no likelier and cost as much, so no deeper depth pays
            break
        for _ in range(50):  # Dinkelbach; converges in a few rounds
            g = goodput(resp)
            if g <= lam * (1 + 1e-12):
                break
            lam, ks = g, resp
            resp = _best_response(probs, depth, lam, costs, budget)
        if ks is not None and lam > best_g:
            best_g, best = lam, ks
    return best if best_g > zero_g * (1 + margin) else [0] * len(cands)


def _any_depth_pays(cands: list[Candidate], costs: MarginalCosts, lam: float) -> bool:
    """Whether some ks beat goodput lam, as far as a bound can tell (False is exact:
    then k = 0 everywhere is the argmax). ks of depth m beat lam iff N(k) - lam T(k) > 0,
    i.e. sum_i V_i(k_i) > lam F(m) with V_i(k) = sum_{j<=k} (P_i(j) - lam c_j); with no
    budget, and each V_i at its best over k <= m, the left side is largest. One pass,
    O(sum of max_k): at 64 requests this settles most steps that do not speculate
    without the Dinkelbach rounds."""
    first = lam * costs.per_draft_token
    further = lam * (costs.per_draft_token + costs.per_draft_row)
    depth = max(c.max_k for c in cands)
    best_at = [0.0] * (depth + 2)  # best_at[m]: sum_i max_{k <= m} V_i(k), as increments
    for c in cands:
        p, value, best = 1.0, 0.0, 0.0
        for j in range(c.max_k):
            p *= c.rates[j]
            value += p - (first if j == 0 else further)
            if value > best:
                best_at[j + 1] += value - best
                best = value
    total = 0.0
    for m in range(1, depth + 1):
        total += best_at[m]
        if total > lam * (costs.draft_catch_up + costs.per_draft_forward * (m - 1)):
            return True
    return False


def _goodput_of(probs: list[list[float]], costs: MarginalCosts, base_tokens: float):
    """predicted_goodput as a function of ks, for candidates with these P(first j
    accepted): O(len(ks)) a call, from prefix sums."""
    sums = []
    for p in probs:
        acc, row = 0.0, [0.0]
        for x in p:
            acc += x
            row.append(acc)
        sums.append(row)

    def goodput(ks: list[int]) -> float:
        tokens = base_tokens + sum(row[k] for row, k in zip(sums, ks, strict=True))
        drafts = sum(ks)
        time = costs.base_time + costs.per_draft_token * drafts
        depth = max(ks, default=0)
        if depth:
            speculating = sum(1 for k in ks if k)
            time += costs.draft_catch_up + costs.per_draft_forward * (depth - 1)
            time += costs.per_draft_row * (drafts - speculating)
        return tokens / time

    return goodput


def _cumulative(c: Candidate) -> list[float]:
    """P(first j drafts accepted) for j = 1..max_k."""
    out, p = [], 1.0
    for r in c.rates[: c.max_k]:
        p *= r
        out.append(p)
    return out


def _best_response(
    probs: list[list[float]], depth: int, lam: float, costs: MarginalCosts, budget: int
) -> list[int]:
    """argmax over k (each k_i <= depth, sum <= budget) of N(k) - lam * T(k)."""
    first_cost = lam * costs.per_draft_token
    next_cost = lam * (costs.per_draft_token + costs.per_draft_row)
    gains: list[tuple[float, int, int]] = []  # (gain, j, request)
    ks = [0] * len(probs)
    for i, p in enumerate(probs):
        for j in range(min(depth, len(p))):
            gain = p[j] - (first_cost if j == 0 else next_cost)
            if gain <= 0:
                break  # gains only fall with j
            gains.append((gain, j, i))
            ks[i] += 1
    if len(gains) <= budget:
        return ks
    gains.sort(key=lambda t: (-t[0], t[1]))  # ties: lower positions first (prefixes)
    ks = [0] * len(probs)
    for _, _, i in gains[:budget]:
        ks[i] += 1
    return ks


def fit_budget(ks: list[int], budget: int) -> list[int]:
    """The fixed policy's (and the warm-up's) ks under a token budget: cap every k at
    one level so that sum(ks) <= budget, the largest cut first; the budget left under
    the cap goes one token each to the requests that were cut."""
    budget = max(budget, 0)
    level = max(ks, default=0)
    while level > 0 and sum(min(k, level) for k in ks) > budget:
        level -= 1
    out = [min(k, level) for k in ks]
    spare = budget - sum(out)
    for i, k in enumerate(ks):
        if spare <= 0:
            break
        if k > level:
            out[i] += 1
            spare -= 1
    return out

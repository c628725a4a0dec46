"""Engine metric families: read from `EngineCore.stats()` when scraped, plus histograms
over each step's `StepStats`.

Counters here mirror the engine's own all-time totals (so they never drift from it);
before the engine is loaded, and with speculation off, every family is still exported,
at zero. Per-step histograms are fed from the engine's ring of recent steps: each
refresh observes the steps it has not seen (by step id), so nothing is counted twice;
steps that left the ring between two refreshes are counted in
`tandem:step_stats_dropped_total` (the server refreshes every second, and the ring holds
`STEP_HISTORY` steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tandem.scheduler.core import EngineStats
    from tandem.scheduler.loop import ServingLoop
    from tandem.scheduler.stats import SpecStats, StepTotals

STEP_HISTORY = 8192  # steps the engine keeps for the server (EngineCore stats_history)
TOKEN_KINDS = ("prefill", "decode", "draft")  # the three parts of a step's token budget
STEP_TOKEN_BUCKETS = tuple(float(2**i) for i in range(16))  # 1 .. 32768
FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
STEP_TIME_BUCKETS: tuple[float, ...]
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
STEP_TIME_BUCKETS += (2.56, 5.12)
SEQS_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024


class StepHistograms:
    """Per-step histograms and counters, fed from the engine's recent steps."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        m = model_name
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.tokens = hist(
            "tandem:iteration_tokens", "Tokens computed per step (all kinds).", STEP_TOKEN_BUCKETS
        ).labels(m)
        by_kind = Histogram(
            "tandem:iteration_tokens_by_kind",
            "Tokens per step by kind: prefill (prompt chunks, recomputation), decode, draft.",
            [*labels, "kind"],
            registry=registry,
            buckets=STEP_TOKEN_BUCKETS,
        )
        self.by_kind = {k: by_kind.labels(m, k) for k in TOKEN_KINDS}
        self.budget = hist(
            "tandem:iteration_budget_usage",
            "Fraction of the step's token budget (max_num_batched_tokens) in use.",
            FRACTION_BUCKETS,
        ).labels(m)
        self.seqs = hist("tandem:iteration_num_seqs", "Sequences per step.", SEQS_BUCKETS).labels(m)
        self.duration = hist(
            "tandem:step_duration_seconds",
            "Wall time of a step (schedule + execute + update).",
            STEP_TIME_BUCKETS,
        ).labels(m)
        self.generated = counter(
            "tandem:step_generated_tokens", "Tokens sampled by steps (accepted drafts included)."
        ).labels(m)
        self.draft_s = counter(
            "tandem:step_draft_seconds", "Time steps spent proposing drafts."
        ).labels(m)
        self.target_s = counter(
            "tandem:step_target_seconds", "Time steps spent in the target forward and sampling."
        ).labels(m)
        self.dropped = counter(
            "tandem:step_stats_dropped", "Steps missing from the per-step histograms."
        ).labels(m)
        self.num_generated_tokens = 0  # what `generated` counted, readable
        self._last_step_id = -1  # the newest step observed
        self._observed_steps = 0  # engine steps accounted for (observed or dropped)

    def observe_new(self, totals: StepTotals, token_budget: int) -> None:
        """Observe the steps of `totals.recent` newer than the last one observed."""
        new = [s for s in totals.recent if s.step_id > self._last_step_id]
        if not new:
            return
        seen_before = totals.num_steps - len(new)
        observed_before = self._observed_steps
        if seen_before > observed_before:
            self.dropped.inc(seen_before - observed_before)
        for s in new:
            num_tokens = s.num_prefill_tokens + s.num_decode_tokens + s.num_draft_tokens
            self.tokens.observe(num_tokens)
            self.by_kind["prefill"].observe(s.num_prefill_tokens)
            self.by_kind["decode"].observe(s.num_decode_tokens)
            self.by_kind["draft"].observe(s.num_draft_tokens)
            if token_budget > 0:
                self.budget.observe(min(1.0, num_tokens / token_budget))
            self.seqs.observe(s.num_seqs)
            self.duration.observe(s.step_time_s)
            self.generated.inc(s.num_sampled_tokens)
            self.num_generated_tokens += s.num_sampled_tokens
            self.draft_s.inc(s.draft_time_s)
            self.target_s.inc(s.target_time_s)
        self._last_step_id = new[-1].step_id
        self._observed_steps = totals.num_steps


class EngineCollector(Collector):
    """Gauges and counters read from the engine when scraped (zeros before it loads)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.token_budget = 0  # max_num_batched_tokens, once attached
        self._loop: ServingLoop | None = None
        self._stats: EngineStats | None = None  # the last refresh

    def attach(self, loop: ServingLoop) -> None:
        self._loop = loop
        self.token_budget = loop.config.max_num_batched_tokens

    def refresh(self) -> EngineStats | None:
        """Read the engine's statistics (thread-safe on the engine side)."""
        if self._loop is not None:
            self._stats = self._loop.stats()
        return self._stats

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield from self._counters()
        yield from spec_families(
            self.model_name, self._stats.scheduler.spec if self._stats else None
        )

    def _gauges(self) -> Iterator[Metric]:
        loop, stats = self._loop, self._stats
        kv = stats.scheduler.kv if stats is not None else None
        values = (
            ("engine_healthy", "1 while the engine loop runs, else 0.", loop is not None and loop.alive),
            ("num_requests_running", "Requests holding KV blocks and being stepped.",
             loop.num_running if loop else 0),
            ("num_requests_waiting", "Requests queued for admission to the engine.",
             loop.num_waiting if loop else 0),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use by requests (0-1).",
             kv.usage if kv else 0.0),
            ("kv_cache_num_blocks", "KV-cache blocks in the pool.", kv.num_blocks if kv else 0),
            ("token_budget", "Tokens one step may compute (max_num_batched_tokens).",
             self.token_budget),
            ("goodput_tokens_per_second",
             "Tokens generated per second of step time over the last steps.",
             stats.steps.recent_goodput if stats else 0.0),
        )  # fmt: skip
        for name, doc, value in values:
            yield _gauge(f"tandem:{name}", doc, self.model_name, float(value))

    def _counters(self) -> Iterator[Metric]:
        stats = self._stats
        sched = stats.scheduler if stats is not None else None
        kv = sched.kv if sched is not None else None
        steps = stats.steps if stats is not None else None
        values = (
            ("num_preemptions", "Requests preempted (KV blocks taken back, recomputed later).",
             sched.num_preemptions if sched else 0),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             kv.prefix_query_tokens if kv else 0),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.",
             kv.prefix_hit_tokens if kv else 0),
            ("prefix_cache_evictions", "Cached KV blocks evicted for reuse.",
             kv.num_evictions if kv else 0),
            ("engine_steps", "Steps executed.", steps.num_steps if steps else 0),
            ("step_seconds", "Wall time of all steps (the engine's busy time).",
             steps.step_time_s if steps else 0.0),
        )  # fmt: skip
        for name, doc, value in values:
            yield _counter(f"tandem:{name}", doc, self.model_name, float(value))
        tokens = CounterMetricFamily(
            "tandem:step_tokens",
            "Tokens computed by steps, by kind: prefill, decode, draft.",
            labels=["model_name", "kind"],
        )
        counts = (0, 0, 0)
        if steps is not None:
            counts = (steps.num_prefill_tokens, steps.num_decode_tokens, steps.num_draft_tokens)
        for kind, n in zip(TOKEN_KINDS, counts, strict=True):
            tokens.add_metric([self.model_name, kind], float(n))
        yield tokens
        guesses = CounterMetricFamily(
            "tandem:overlap_guesses",
            "Overlapped decode (--overlap-decode): guessed next steps, by outcome: taken "
            "(the step's results were the guess) or dropped.",
            labels=["model_name", "outcome"],
        )
        taken, dropped = (steps.num_guesses_taken, steps.num_guesses_dropped) if steps else (0, 0)
        guesses.add_metric([self.model_name, "taken"], float(taken))
        guesses.add_metric([self.model_name, "dropped"], float(dropped))
        yield guesses


def spec_families(model_name: str, spec: SpecStats | None) -> Iterator[Metric]:
    """Speculation families; all zero (one position, k = 0) while speculation is off."""
    values = (
        ("num_drafts", "Sequence-steps that verified drafts.", spec.num_drafts if spec else 0),
        ("num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens if spec else 0),
        ("num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens if spec else 0),
        ("predicted_step_seconds", "Step time the cost model predicted (predicted steps).",
         spec.predicted_step_time_s if spec else 0.0),
        ("measured_step_seconds", "Step time measured (the same steps).",
         spec.measured_step_time_s if spec else 0.0),
        ("predicted_steps", "Steps with both a prediction and a measurement.",
         spec.num_predicted_steps if spec else 0),
    )  # fmt: skip
    for name, doc, value in values:
        yield _counter(f"tandem:spec_decode_{name}", doc, model_name, float(value))
    per_pos = CounterMetricFamily(
        "tandem:spec_decode_num_accepted_tokens_per_pos",
        "Draft tokens accepted at each position (1 = the first draft).",
        labels=["model_name", "position"],
    )
    for j, n in enumerate((spec.accepted_per_pos if spec else None) or [0]):
        per_pos.add_metric([model_name, str(j + 1)], float(n))
    yield per_pos
    yield from vllm_spec_families(model_name, spec)
    yield _k_histogram(model_name, (spec.k_histogram if spec else None) or [0])


def vllm_spec_families(model_name: str, spec: SpecStats | None) -> Iterator[Metric]:
    """The same counters under vLLM's names (`vllm:spec_decode_*`), so tools written
    for vLLM, such as `vllm bench serve`, read Tandem's acceptance too."""
    for name, value in (
        ("num_drafts", spec.num_drafts if spec else 0),
        ("num_draft_tokens", spec.num_draft_tokens if spec else 0),
        ("num_accepted_tokens", spec.num_accepted_tokens if spec else 0),
    ):
        doc = f"vLLM-compatible alias of tandem:spec_decode_{name}."
        yield _counter(f"vllm:spec_decode_{name}", doc, model_name, float(value))
    per_pos = CounterMetricFamily(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "vLLM-compatible alias of tandem:spec_decode_num_accepted_tokens_per_pos.",
        labels=["model_name", "position"],
    )
    for j, n in enumerate((spec.accepted_per_pos if spec else None) or [0]):
        per_pos.add_metric([model_name, str(j)], float(n))  # vLLM counts positions from 0
    yield per_pos


def _k_histogram(model_name: str, counts: list[int]) -> HistogramMetricFamily:
    """The k chosen per decoding sequence-step, from counts per k (index = k)."""
    family = HistogramMetricFamily(
        "tandem:spec_decode_chosen_k",
        "Draft length k chosen per decoding sequence-step (0 = no speculation).",
        labels=["model_name"],
    )
    buckets, total = [], 0
    for k, n in enumerate(counts):
        total += n
        buckets.append((f"{k:.1f}", float(total)))  # "0.0", as prometheus_client writes le
    buckets.append(("+Inf", float(total)))
    k_sum = float(sum(k * n for k, n in enumerate(counts)))
    family.add_metric([model_name], buckets, sum_value=k_sum)
    return family


def _gauge(name: str, doc: str, model_name: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["model_name"])
    g.add_metric([model_name], value)
    return g


def _counter(name: str, doc: str, model_name: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["model_name"])
    c.add_metric([model_name], value)
    return c

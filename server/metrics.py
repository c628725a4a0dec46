"""The server's Prometheus metrics, in a registry owned by one app (no global state).

Every family is registered when the app is built, before the engine loads, and every
series a dashboard or alert reads exists from the first scrape at zero: names start
with `tandem:` (the speculation counters also under vLLM's `vllm:spec_decode_*` names)
and carry the label `model_name`. Three sources:

- request families (this file), observed by the server when a request ends, from
  its `RequestTimes`: latency histograms, token counters, finish reasons;
- HTTP families, counted by the gatekeeper middleware: status codes, 429s, 5xx;
- engine families (`metrics_engine.py`), read from `EngineCore.stats()` at scrape time
  and from each step's `StepStats`: queues, KV and prefix cache, tokens per step,
  the token budget, speculation.

README.md's "Metrics" table lists them all; a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from tandem.server.metrics_engine import EngineCollector, StepHistograms
from tandem.server.request_stats import RequestTimes

if TYPE_CHECKING:
    from tandem.scheduler.core import EngineStats
    from tandem.scheduler.loop import ServingLoop

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODEL_LABEL = "model_name"
FINISH_REASONS = ("stop", "length", "abort")  # "abort": cancelled, disconnected or failed

TTFT_BUCKETS: tuple[float, ...]
ITL_BUCKETS: tuple[float, ...]
LATENCY_BUCKETS: tuple[float, ...]
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4)
ITL_BUCKETS += (0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS += (15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
LATENCY_BUCKETS += (7680.0,)
# 1, 2, 5, 10, 20, 50, ... 1e6 tokens
LENGTH_BUCKETS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1e6)


class ServerMetrics:
    """The metrics of one server; `render()` answers GET /metrics."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.steps = StepHistograms(self.registry, model_name)
        self.engine = EngineCollector(model_name)
        self.registry.register(self.engine)
        self._add_http_families()
        self._add_request_families()

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, [MODEL_LABEL, *labels], registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: Iterable[float]) -> Histogram:
        return Histogram(name, doc, [MODEL_LABEL], registry=self.registry, buckets=tuple(buckets))

    def _add_http_families(self) -> None:
        self.http_requests = self._counter(
            "tandem:http_requests", "HTTP requests by route and status code.", ["route", "status"]
        )
        self.rejected = self._counter(
            "tandem:request_rejected", "Requests refused with 429 (the waiting queue was full)."
        ).labels(self.model_name)
        self.server_errors = self._counter(
            "tandem:request_errors",
            "API requests (/v1/...) answered with a 5xx status (not /health's 503s).",
        ).labels(self.model_name)

    def _add_request_families(self) -> None:
        m = self.model_name
        self.prompt_tokens = self._counter(
            "tandem:prompt_tokens", "Prompt tokens of admitted requests."
        ).labels(m)
        self.generation_tokens = self._counter(
            "tandem:generation_tokens", "Tokens generated (counted when a request ends)."
        ).labels(m)
        success = self._counter(
            "tandem:request_success",
            "Engine requests ended, by finish reason.",
            ["finished_reason"],
        )
        self.success = {r: success.labels(m, r) for r in FINISH_REASONS}
        hist = self._histogram
        self.ttft = hist(
            "tandem:time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS
        ).labels(m)
        self.itl = hist(
            "tandem:inter_token_latency_seconds",
            "Time per output token after the first (a multi-token output is spread evenly).",
            ITL_BUCKETS,
        ).labels(m)
        self.e2e = hist(
            "tandem:e2e_request_latency_seconds", "Arrival to the end.", LATENCY_BUCKETS
        ).labels(m)
        self.queue_time = hist(
            "tandem:request_queue_time_seconds", "Arrival to first admission.", LATENCY_BUCKETS
        ).labels(m)
        self.prefill_time = hist(
            "tandem:request_prefill_time_seconds",
            "First admission to first token.",
            LATENCY_BUCKETS,
        ).labels(m)
        self.decode_time = hist(
            "tandem:request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS
        ).labels(m)
        self.inference_time = hist(
            "tandem:request_inference_time_seconds",
            "First admission to last token.",
            LATENCY_BUCKETS,
        ).labels(m)
        self.prompt_len = hist(
            "tandem:request_prompt_tokens", "Prompt length of ended requests.", LENGTH_BUCKETS
        ).labels(m)
        self.generation_len = hist(
            "tandem:request_generation_tokens",
            "Tokens generated per ended request.",
            LENGTH_BUCKETS,
        ).labels(m)

    # ---- the engine ----------------------------------------------------------------

    def attach(self, loop: ServingLoop) -> None:
        """Read engine families from this loop from now on."""
        self.engine.attach(loop)

    def refresh(self) -> EngineStats | None:
        """Read the engine's statistics once: the engine families then report them, and
        steps not seen before are observed into the step histograms. None before the
        engine is attached. Call it from one thread (the event loop)."""
        stats = self.engine.refresh()
        if stats is not None:
            self.steps.observe_new(stats.steps, self.engine.token_budget)
        return stats

    # ---- what the server counts ----------------------------------------------------

    def count_http(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, str(status)).inc()
        if status == 429:
            self.rejected.inc()
        elif status >= 500 and route.startswith("/v1/"):
            # /health answers 503 while loading or draining: a state, not an error
            self.server_errors.inc()

    def count_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def observe_request(
        self, times: RequestTimes, num_prompt_tokens: int, num_output_tokens: int, reason: str
    ) -> None:
        """One engine request ended with `reason` (stop | length | abort)."""
        self.generation_tokens.inc(num_output_tokens)
        self.success.get(reason, self.success["abort"]).inc()
        self.prompt_len.observe(num_prompt_tokens)
        self.generation_len.observe(num_output_tokens)
        for value, hist in (
            (times.ttft, self.ttft),
            (times.e2e, self.e2e),
            (times.queue_time, self.queue_time),
            (times.prefill_time, self.prefill_time),
            (times.decode_time, self.decode_time),
            (times.inference_time, self.inference_time),
        ):
            if value is not None:
                hist.observe(value)
        for latency in times.inter_token_latencies():
            self.itl.observe(latency)

    def render(self) -> bytes:
        """The Prometheus text exposition, engine statistics read now."""
        self.refresh()
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]


class _WithoutCreated:
    """The registry's families minus the `*_created` timestamps prometheus_client adds
    to counters and histograms (noise for dashboards; vLLM drops them too)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric

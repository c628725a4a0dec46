"""The server's Prometheus metrics, in a registry owned by one app (no global state).

The full metric set belongs to the observability work; these exist from the start:
running/waiting gauges (read from the engine loop at scrape time), HTTP request
counters by route and status, and token counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LoopGauges(Collector):
    """Gauges computed when scraped, so they cost nothing between scrapes."""

    def __init__(self, read: Callable[[], tuple[int, int] | None]) -> None:
        self._read = read  # -> (running, waiting), or None before the engine exists

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = self._read() or (0, 0)
        running = GaugeMetricFamily(
            "tandem_num_requests_running", "Requests holding KV blocks and being stepped."
        )
        running.add_metric([], counts[0])
        waiting = GaugeMetricFamily(
            "tandem_num_requests_waiting", "Requests queued for admission to the engine."
        )
        waiting.add_metric([], counts[1])
        return [running, waiting]


class ServerMetrics:
    """Counters the server updates and the gauges it exposes on GET /metrics."""

    def __init__(self, read_loop_counts: Callable[[], tuple[int, int] | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_LoopGauges(read_loop_counts))
        self.http_requests = Counter(
            "tandem_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of admitted requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens", "Tokens generated.", registry=self.registry
        )
        self.request_success = Counter(
            "tandem_request_success",
            "Choices completed, by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )

    def count_http(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    def count_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def count_finished(self, choices: Iterable[Any]) -> None:
        """Each choice: a ChoiceDecoder that has finished (num_output_tokens, finish_reason)."""
        for c in choices:
            self.generation_tokens.inc(c.num_output_tokens)
            self.request_success.labels(c.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

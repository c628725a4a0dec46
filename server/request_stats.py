"""Per-request timing, as the server sees it: when each engine output reached the event
loop. The metrics' latency histograms and the per-request log line are computed from it.

    arrival ──queue── first_scheduled ──prefill── first_token ──decode── last_token
    └────────────── TTFT ──────────────────────────┘
    └────────────────────────────── e2e ─────────────────────────────────┘

Times are `time.monotonic()` seconds: the request's arrival (set by the server when it
built the engine request), the engine's first admission (the scheduler's clock), and
the event-loop time each output with tokens arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.scheduler.request import RequestOutput


@dataclass(slots=True)
class RequestTimes:
    """When one engine request's outputs arrived. `record` each output, in order."""

    arrival: float  # the request was built (monotonic seconds)
    first_scheduled: float | None = None  # the engine first admitted it (queue time ends)
    first_token: float | None = None  # its first output with tokens arrived
    last_token: float | None = None  # its latest output with tokens arrived
    finished: float | None = None  # its last output (or its abandonment) was handled
    gaps: list[tuple[float, int]] = field(default_factory=list)  # one per output after
    # the first with tokens: (seconds since the previous such output, tokens it brought)

    def record(self, out: RequestOutput, now: float) -> None:
        """Note one output that arrived at `now`."""
        if self.first_scheduled is None and out.first_scheduled_time is not None:
            self.first_scheduled = out.first_scheduled_time
        if out.new_token_ids:
            if self.last_token is None:
                self.first_token = now
            else:
                self.gaps.append((now - self.last_token, len(out.new_token_ids)))
            self.last_token = now
        if out.finished:
            self.finished = now

    def end(self, now: float) -> None:
        """The request is over (finished, aborted or abandoned) at `now`."""
        if self.finished is None:
            self.finished = now

    @property
    def ttft(self) -> float | None:
        """Arrival to the first token; None if no token came."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        """Arrival to the end; None while running."""
        return None if self.finished is None else self.finished - self.arrival

    @property
    def queue_time(self) -> float | None:
        """Arrival to the engine's first admission."""
        if self.first_scheduled is None:
            return None
        return max(0.0, self.first_scheduled - self.arrival)

    @property
    def prefill_time(self) -> float | None:
        """First admission to the first token (prompt chunks, and any wait between)."""
        if self.first_scheduled is None or self.first_token is None:
            return None
        return max(0.0, self.first_token - self.first_scheduled)

    @property
    def decode_time(self) -> float | None:
        """First token to the last token."""
        if self.first_token is None or self.last_token is None:
            return None
        return self.last_token - self.first_token

    @property
    def inference_time(self) -> float | None:
        """First admission to the last token."""
        if self.first_scheduled is None or self.last_token is None:
            return None
        return max(0.0, self.last_token - self.first_scheduled)

    def inter_token_latencies(self) -> list[float]:
        """One value per token after the first: an output that brought n tokens (several
        accepted drafts) after a gap of g seconds counts n tokens of g / n each, so the
        mean is the decode time per token."""
        return [gap / n for gap, n in self.gaps for _ in range(n)]

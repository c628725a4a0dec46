"""Step statistics: what each step computed and how long it took, for metrics.

The engine thread records; any thread may read a snapshot (a lock guards the ring).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class StepStats:
    """One executed step."""

    step_id: int
    num_seqs: int  # sequences in the step
    num_prefill_tokens: int  # prompt-chunk and recomputed tokens
    num_decode_tokens: int  # one per decoding sequence
    num_draft_tokens: int  # speculative tokens proposed for verification
    num_accepted_drafts: int  # of those, accepted
    num_sampled_tokens: int  # tokens the step generated (accepted drafts + one per
    # sampling sequence), before stop checks
    num_outputs: int  # request outputs the step produced
    step_time_s: float  # schedule + execute + update, wall clock
    execute_time_s: float  # the executor's share of it, wall clock
    draft_time_s: float  # as the executor measured it
    target_time_s: float  # as the executor measured it
    kv_usage: float  # fraction of KV blocks in use after the step
    num_running: int  # after the step
    num_waiting: int  # after the step
    overlap: str | None = None  # StepResult.overlap: "taken", "dropped" or None


@dataclass(slots=True)
class StepTotals:
    """Sums over every recorded step, plus the most recent steps."""

    num_steps: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_draft_tokens: int
    num_accepted_drafts: int
    step_time_s: float
    execute_time_s: float
    recent: list[StepStats]  # oldest first, at most `history` of them
    num_guesses_taken: int = 0  # overlapped decode: steps whose results were the guess
    num_guesses_dropped: int = 0  # guesses the next plan did not match

    @property
    def recent_goodput(self) -> float:
        """Generated tokens per second of wall time over the recent steps (0 if none)."""
        seconds = sum(s.step_time_s for s in self.recent)
        return sum(s.num_sampled_tokens for s in self.recent) / seconds if seconds > 0 else 0.0


class StepStatsRecorder:
    """Accumulates StepStats; thread-safe."""

    def __init__(self, history: int = 256) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self._lock = threading.Lock()
        self._recent: deque[StepStats] = deque(maxlen=history)
        self._totals = StepTotals(0, 0, 0, 0, 0, 0.0, 0.0, [])

    def record(self, s: StepStats) -> None:
        with self._lock:
            t = self._totals
            t.num_steps += 1
            t.num_prefill_tokens += s.num_prefill_tokens
            t.num_decode_tokens += s.num_decode_tokens
            t.num_draft_tokens += s.num_draft_tokens
            t.num_accepted_drafts += s.num_accepted_drafts
            t.step_time_s += s.step_time_s
            t.execute_time_s += s.execute_time_s
            t.num_guesses_taken += s.overlap == "taken"
            t.num_guesses_dropped += s.overlap == "dropped"
            self._recent.append(s)

    def snapshot(self) -> StepTotals:
        with self._lock:
            t = self._totals
            return StepTotals(
                t.num_steps,
                t.num_prefill_tokens,
                t.num_decode_tokens,
                t.num_draft_tokens,
                t.num_accepted_drafts,
                t.step_time_s,
                t.execute_time_s,
                list(self._recent),
                t.num_guesses_taken,
                t.num_guesses_dropped,
            )


@dataclass(slots=True)
class SpecStats:
    """Speculation counters for metrics (vLLM's spec_decode_* names in comments)."""

    num_drafts: int = 0  # request-steps that verified drafts (num_drafts)
    num_draft_tokens: int = 0  # drafts verified (num_draft_tokens)
    num_accepted_tokens: int = 0  # drafts kept (num_accepted_tokens)
    accepted_per_pos: list[int] = field(default_factory=list)  # (K,) drafts kept at
    # position j+1 (num_accepted_tokens_per_pos)
    k_histogram: list[int] = field(default_factory=list)  # (K+1,) decoding request-steps
    # that got each k
    predicted_step_time_s: float = 0.0  # sum over measured steps of the predicted time
    measured_step_time_s: float = 0.0  # sum over the same steps of the measured time
    num_predicted_steps: int = 0  # steps with both a prediction and a measurement

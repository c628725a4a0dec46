"""Requests: what the server submits, what comes back, and the scheduler's own state.

`Request` owns a request's token history (prompt + outputs) and status; workers only
mirror it. Its `num_computed_tokens` catches up with `token_ids` one step at a time:
prompt chunks, a decode's single token and recomputation after a preemption are the
same rule (the scheduler knows tokens, not phases).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

from tandem.engine.plan import SamplingParams, TokenLogprobs
from tandem.scheduler.spec_control import RequestSpec


class RequestStatus(IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0  # queued, holds no blocks
    RUNNING = 1  # admitted: holds KV blocks, scheduled each step while the budget allows
    PREEMPTED = 2  # blocks taken back; waits at the front of the queue to be recomputed
    FINISHED_STOPPED = 3  # sampled eos or a stop token id
    FINISHED_LENGTH = 4  # max_tokens, max_model_len, or it outgrew the whole KV pool
    FINISHED_ABORTED = 5  # aborted by the client, or failed with an error

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish reason: "stop" | "length" | "abort", None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class GenerateRequest:
    """What the server submits: one request (the server fans `n` out into n of these)."""

    request_id: str  # unique among live requests
    prompt_token_ids: list[int]  # the tokenized prompt, at least one token
    sampling: SamplingParams  # how to pick tokens, when to stop
    arrival_time: float = field(default_factory=time.monotonic)  # time.monotonic() seconds
    max_draft_tokens: int | None = None  # cap on this request's k per step (0 = never
    # speculate); None = the server's num_speculative_tokens

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        k = self.max_draft_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise ValueError(f"request {self.request_id}: max_draft_tokens must be >= 0, got {k!r}")
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt has no tokens")
        bad = [t for t in self.prompt_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(
                f"request {self.request_id}: prompt token ids must be ints >= 0, got {bad[:5]}"
            )


@dataclass(slots=True)
class RequestOutput:
    """What comes back: once per step for each request with news (tokens or the end)."""

    request_id: str
    new_token_ids: list[int]  # sampled this step; includes the stop token that ended it
    new_logprobs: list[TokenLogprobs] | None  # one per new token when asked, else None
    prompt_logprobs: list[TokenLogprobs | None] | None  # the whole prompt's (first entry
    # None: nothing precedes it); sent once, with the request's first output
    finished: bool  # True on the request's last output
    finish_reason: str | None  # "stop" | "length" | "abort", None while unfinished
    stop_token_id: int | None  # the eos / stop token id that finished it, if any
    num_prompt_tokens: int
    num_output_tokens: int  # outputs so far, this step's included
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    error: str | None = None  # set when the request failed rather than ended normally
    num_draft_tokens: int = 0  # speculative drafts verified for it so far
    num_accepted_draft_tokens: int = 0  # of those, accepted
    first_scheduled_time: float | None = None  # the request's first admission (clock
    # seconds, the scheduler's clock: time.monotonic when serving); None before it


@dataclass(slots=True, eq=False)  # identity equality: requests are entities
class Request:
    """The scheduler's state of one request. Invariant: num_computed_tokens <= len(token_ids)."""

    request_id: str
    seq_id: int  # engine-wide id of the sequence, never reused
    sampling: SamplingParams
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt
    arrival_time: float  # time.monotonic() seconds
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in this request's blocks
    block_ids: list[int] = field(default_factory=list)  # KV blocks, in position order
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full
    # block of token_ids known so far (a pure function of the tokens, kept across preemptions)
    num_registered_blocks: int = 0  # leading blocks offered to the prefix cache
    num_cached_tokens: int = 0  # prefix-cache hit tokens at the first admission
    on_worker: bool = False  # a worker holds a mirror (sent as new since the last preemption)
    num_preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # gathered
    # chunk by chunk; complete once the prompt is computed
    prompt_logprobs_sent: bool = False
    stop_token_id: int | None = None  # the token that finished it, if any
    first_scheduled_time: float | None = None  # first admission (queue time ends)
    first_token_time: float | None = None  # first sampled token (TTFT)
    finished_time: float | None = None
    max_draft_tokens: int | None = None  # from GenerateRequest: cap on k, None = K
    spec: RequestSpec | None = None  # speculation state (acceptance, n-gram index), made
    # on its first decode when speculation is on
    num_draft_tokens: int = 0  # drafts verified, all steps
    num_accepted_draft_tokens: int = 0  # of those, accepted

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_outputs(
        self,
        token_ids: list[int],
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> int:
        """Append sampled tokens until one of them finishes the request; sets status.

        Returns how many of `token_ids` were taken (the rest, after a stop token or
        past a length limit, are dropped). Rules, checked after each token: eos (unless
        ignore_eos) and stop_token_ids end it with "stop" once more than min_tokens
        outputs exist; max_tokens and max_model_len end it with "length".
        """
        sp = self.sampling
        taken = 0
        for tok in token_ids:
            if self._length_reached(max_model_len):
                break
            self.token_ids.append(tok)
            taken += 1
            is_eos = tok in eos_token_ids and not sp.ignore_eos
            if (is_eos or tok in sp.stop_token_ids) and self.num_output_tokens > sp.min_tokens:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_token_id = tok
                return taken
        if self._length_reached(max_model_len):
            self.status = RequestStatus.FINISHED_LENGTH
        return taken

    def _length_reached(self, max_model_len: int) -> bool:
        return (
            self.num_output_tokens >= self.sampling.max_tokens
            or len(self.token_ids) >= max_model_len
        )

    def add_prompt_logprobs(self, chunk: list[TokenLogprobs | None]) -> None:
        """Gather one chunk's prompt logprobs; a recomputation after they are complete
        (a preemption) is ignored."""
        missing = self.num_prompt_tokens - len(self.prompt_logprobs)
        if missing > 0:
            self.prompt_logprobs.extend(chunk[:missing])

    def make_output(
        self, new_token_ids: list[int], new_logprobs: list[TokenLogprobs] | None
    ) -> RequestOutput:
        """This step's output; the prompt logprobs ride along once, on the first one
        (an abort before the prompt is computed gets none)."""
        prompt_lps = None
        complete = len(self.prompt_logprobs) == self.num_prompt_tokens
        if self.sampling.prompt_logprobs is not None and complete and not self.prompt_logprobs_sent:
            prompt_lps = list(self.prompt_logprobs)
            self.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=new_token_ids,
            new_logprobs=new_logprobs,
            prompt_logprobs=prompt_lps,
            finished=self.status.is_finished,
            finish_reason=self.status.finish_reason,
            stop_token_id=self.stop_token_id,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_draft_tokens=self.num_accepted_draft_tokens,
            first_scheduled_time=self.first_scheduled_time,
        )

"""The contract between the scheduler and the engine: one step as plain data.

This module imports no torch, so `tandem.scheduler` can build plans without it. Only
lists, ints, floats and strings cross it (picklable, cheap to send to Ray workers).

A step, worked through: two sequences, block_size 4.

    seq 7 is new, prompt [5, 6, 7, 8, 9, 10] (6 tokens), token budget 4:
        SeqPlan(seq_id=7, token_ids=[5, 6, 7, 8], start_pos=0, new_block_ids=[0],
                sample=False, new=NewSeq(sampling=..., num_prompt_tokens=6))
    seq 3 is decoding; 9 tokens computed, it last sampled token 42:
        SeqPlan(seq_id=3, token_ids=[42], start_pos=9, new_block_ids=[], sample=True)

    The next step finishes seq 7's prompt and samples its first token:
        SeqPlan(seq_id=7, token_ids=[9, 10], start_pos=4, new_block_ids=[1], sample=True)

Workers keep a mirror of each sequence (its token ids, block table, sampling params)
that these plans extend; the mirror never advances on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True, frozen=True)
class StructuredOutput:
    """A constraint on a request's output, enforced by a token mask at every sampled
    position (compiled by the engine with llguidance, `tandem.engine.structured`).

    kind -> spec:
        "json_schema" -> a JSON schema, as JSON text
        "json_object" -> "" (any JSON object)
        "regex"       -> a regular expression the whole output must match
        "choice"      -> a JSON list of strings; the output is exactly one of them
        "grammar"     -> a Lark grammar (llguidance dialect; `%json {...}` embeds a
                         schema) or a GBNF/EBNF grammar (recognised by `::=`)
    """

    kind: str  # one of STRUCTURED_KINDS
    spec: str  # see above

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(
                f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, "
                f"got {self.kind!r}"
            )


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request. Defaults mean plain sampling at T=1."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p(top token)
    seed: int | None = None  # noise is a function of (seed, output position) only
    presence_penalty: float = 0.0  # subtracted once from each token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt + output; 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit
    min_tokens: int = 0  # eos and stop_token_ids are masked until this many outputs
    max_tokens: int = 16  # outputs to generate at most
    ignore_eos: bool = False  # keep going past eos (scheduler) ; sampler unaffected
    stop_token_ids: list[int] = field(default_factory=list)  # finish on these too
    logprobs: int | None = None  # None = none; N >= 0: sampled token's logprob + top N
    prompt_logprobs: int | None = None  # None = none; N >= 0: each prompt token + top N
    structured: StructuredOutput | None = None  # constrain outputs (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= 20:
                raise ValueError(f"{name} must be in [0, 20], got {n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class NewSeq:
    """Sent once, with a sequence's first plan (also after a preemption)."""

    sampling: SamplingParams
    num_prompt_tokens: int  # tokens before this count are prompt; the rest are outputs
    # (after a preemption by recompute, earlier outputs are recomputed as plain tokens)
    prefix_token_ids: list[int] = field(default_factory=list)  # tokens at positions
    # [0, start_pos) whose KV is already in the plan's first blocks (a prefix-cache hit);
    # the mirror starts with them. Empty when the first plan starts at position 0.


@dataclass(slots=True)
class SeqPlan:
    """One sequence's share of a step."""

    seq_id: int  # engine-wide id, unique while the sequence lives
    token_ids: list[int]  # tokens to compute now: a prompt chunk, or the last sampled token
    start_pos: int  # position of token_ids[0] (= tokens already in the KV cache)
    new_block_ids: list[int]  # KV blocks appended to this sequence's table since last step;
    # the table first keeps only the ceil((start_pos + KVCacheInfo.lookahead_slots) /
    # block_size) blocks that hold computed tokens or the positions just past them
    # (blocks given for rejected drafts are taken back by the scheduler)
    sample: bool  # sample after the last token (False for a non-final prompt chunk)
    new: NewSeq | None = None  # set on the sequence's first plan
    num_draft: int = 0  # k: draft tokens to propose and verify (0 = plain decode)
    draft_token_ids: list[int] = field(default_factory=list)  # drafts proposed by the
    # scheduler (n-gram); empty when the engine's draft model proposes
    draft_catch_up: bool = True  # draft model: in a step where it runs, bring this
    # sequence's draft KV up to date (and at k = 0 probe it); False leaves it behind
    # until a step that catches it up (k >= 1 always does)


@dataclass(slots=True)
class StepPlan:
    """Everything the engine needs for one step."""

    step_id: int
    seqs: list[SeqPlan]  # order is the order of results
    finished_seq_ids: list[int] = field(default_factory=list)  # free worker state (before)
    preempted_seq_ids: list[int] = field(default_factory=list)  # ditto, resent as new later
    admits_next: bool = False  # hint: a request waits that the next step may admit (a
    # seat and its first chunk's blocks are free), so that step will not be this step's
    # continuation (an engine guessing the next step does not); set only for engines
    # that declare KVCacheInfo.lookahead_slots

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) + s.num_draft for s in self.seqs)


@dataclass(slots=True)
class TokenLogprobs:
    """Logprobs for one position: the chosen token's and the top N alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; len N
    rank: int = 1  # 1-based rank of token_id in the distribution


@dataclass(slots=True)
class SeqResult:
    """What one sequence produced in a step."""

    seq_id: int
    token_ids: list[int]  # sampled tokens (1 .. k+1); empty if the plan did not sample
    logprobs: list[TokenLogprobs] | None = None  # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # one per planned prompt
    # token of this chunk; None for the sequence's very first token (nothing precedes it)
    num_accepted_drafts: int = 0  # drafts kept (token_ids = those drafts + 1 more)
    probe_accepted: bool | None = None  # k = 0 with a draft model: whether the draft the
    # sequence would have got equals the token sampled (acceptance statistics while not
    # speculating); None when not probed
    lookback_accepted: bool | None = None  # draft model, after a step whose drafts were
    # all kept: whether the draft it would have proposed next equals the bonus token
    # that step sampled (this step's first token); None when not looked at


@dataclass(slots=True)
class StepResult:
    step_id: int
    seqs: list[SeqResult]  # one per SeqPlan that sampled or asked for prompt logprobs
    draft_time_s: float = 0.0  # time spent proposing drafts
    target_time_s: float = 0.0  # time of the target forward + sampling
    phase_times_s: dict[str, float] = field(default_factory=dict)  # prepare/forward/sample
    overlap: str | None = None  # overlapped decode: "taken" when the step's results were
    # the guess queued the step before, "dropped" when a guess was dropped for it


@dataclass(slots=True, frozen=True)
class KVCacheInfo:
    """What the scheduler needs to know about the engine's KV cache."""

    num_blocks: int
    block_size: int
    max_model_len: int  # tokens per sequence the engine can hold (prompt + output)
    eos_token_ids: tuple[int, ...]  # from the model's generation config
    vocab_size: int  # token ids are < this (the model's embedding rows)
    lookahead_slots: int = 0  # positions past a sampling step's tokens that the engine
    # may compute before the next plan (overlapped decode): the scheduler gives their
    # blocks with the step when free, and both sides keep blocks_for(computed tokens +
    # lookahead_slots) when they cut a table back


class Executor(Protocol):
    """Runs steps. In-process (`UniExecutor`) or across Ray tensor-parallel workers."""

    def kv_cache_info(self) -> KVCacheInfo: ...

    def execute(self, plan: StepPlan) -> StepResult: ...

    def shutdown(self) -> None: ...

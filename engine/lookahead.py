"""Overlapped decode steps: the next step is queued on the device before this one's
tokens reach the host.

On a GPU a decode step is short (about a millisecond for a 1B model at batch 1), and
the host's share of a step is about as long: turning the plan into tensors, launching,
reading the sampled tokens back, then the scheduler's bookkeeping and the next plan.
One after the other, the device idles while the host works. With overlap on, right
after a step's sampling is queued, before its one host sync, the worker also queues
the step most likely to come next, its *guess*: every sequence decodes the token just
sampled (read on the device, never copied), one position on. The next plan either is
that step, and its results are the ones already computed, or it is not, and the guess
is dropped. Nothing else changes: the scheduler does not know guesses exist.

A dropped guess's only trace is its KV write at each sequence's next position, inside
a block the sequence holds but has not filled: if the sequence goes on, its real step
recomputes that slot first; if it was freed, the block was not full, so it was never
in the prefix cache and its next owner writes before it reads.

A guess is made only where it can be right: every sequence of the step sampled with no
drafts, none finishes by max_tokens or max_model_len, each next position lies in a
block the sequence already holds (the next plan would bring a new block otherwise),
and sampling reads no token history (penalties, min_tokens, a grammar: the token it
would read is still on the device). After a dropped guess the worker makes none for
1, 2, 4 ... 64 steps (doubling while guesses keep missing), so a workload whose
batches keep changing wastes little device time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tandem.engine.plan import SeqPlan, StepPlan
from tandem.engine.seq_state import SeqState

MAX_BACKOFF = 64  # steps without guessing after a run of missed guesses, at most

Queued = TypeVar("Queued")  # the worker's handle on the guessed step's queued work


@dataclass(slots=True)
class Guess(Generic[Queued]):
    """The step queued ahead: what the next plan must be for its results to stand."""

    seq_ids: list[int]
    start_pos: list[int]  # each sequence's next position (its guessed token goes there)
    block_ids: list[int]  # the block holding that position
    queued: Queued
    token_ids: list[int] = field(default_factory=list)  # the tokens sampled by the step
    # before the guess: the ones the next plan must compute (set once they are known)


class Lookahead(Generic[Queued]):
    """When to guess, and whether a plan is the guess. Counts hits and misses."""

    def __init__(self, enabled: bool, block_size: int, max_model_len: int) -> None:
        self.enabled = enabled
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.guess: Guess[Queued] | None = None
        self.num_hits = 0  # plans that were the guess
        self.num_misses = 0  # guesses dropped
        self._pause = 0  # steps left without guessing
        self._backoff = 1  # the pause after the next miss

    def take(self, plan: StepPlan, states: list[SeqState]) -> Queued | None:
        """The queued work of the guess if `plan` (applied to `states`) is that step;
        else None, and the guess, if any, is dropped."""
        guess, self.guess = self.guess, None
        if guess is None:
            return None
        if self._is(guess, plan, states):
            self.num_hits += 1
            self._backoff = 1
            return guess.queued
        self.num_misses += 1
        self._pause = self._backoff
        self._backoff = min(2 * self._backoff, MAX_BACKOFF)
        return None

    def wanted(self, plan: StepPlan, states: list[SeqState]) -> bool:
        """Whether to queue a guess after `plan` (called once per step)."""
        if not self.enabled:
            return False
        if self._pause:
            self._pause -= 1
            return False
        return bool(plan.seqs) and all(
            self._can_follow(p, s) for p, s in zip(plan.seqs, states, strict=True)
        )

    def next_positions(self, plan: StepPlan) -> list[int]:
        """Where each sequence's next token goes: after this step's tokens."""
        return [p.start_pos + len(p.token_ids) for p in plan.seqs]

    def hold(self, plan: StepPlan, states: list[SeqState], queued: Queued) -> None:
        """Keep the guess queued after `plan`."""
        positions = self.next_positions(plan)
        blocks = [
            s.block_table[pos // self.block_size] for s, pos in zip(states, positions, strict=True)
        ]
        self.guess = Guess([p.seq_id for p in plan.seqs], positions, blocks, queued)

    def expect(self, token_ids: list[int]) -> None:
        """The tokens this step sampled, one per sequence: the next plan's inputs."""
        if self.guess is not None:
            self.guess.token_ids = token_ids

    def _can_follow(self, p: SeqPlan, s: SeqState) -> bool:
        if not p.sample or p.num_draft or p.draft_token_ids or not s.history_free:
            return False
        pos = p.start_pos + len(p.token_ids)  # the token sampled now goes here next
        num_outputs = pos + 1 - s.num_prompt_tokens  # after this step
        return (
            pos % self.block_size != 0
            and len(s.block_table) > pos // self.block_size
            and num_outputs < s.sampling.max_tokens
            and pos + 1 < self.max_model_len
        )

    def _is(self, guess: Guess, plan: StepPlan, states: list[SeqState]) -> bool:
        if len(plan.seqs) != len(guess.seq_ids) or len(guess.token_ids) != len(plan.seqs):
            return False
        for i, (p, s) in enumerate(zip(plan.seqs, states, strict=True)):
            if (
                p.seq_id != guess.seq_ids[i]
                or p.new is not None
                or p.start_pos != guess.start_pos[i]
                or p.token_ids != [guess.token_ids[i]]
                or not p.sample
                or p.num_draft
                or p.draft_token_ids
                or s.block_table[p.start_pos // self.block_size] != guess.block_ids[i]
            ):
                return False
        return True

"""Overlapped decode steps: the next step is queued on the device before this one's
tokens reach the host.

On a GPU a decode step is short (about a millisecond for a 1B model at batch 1), and
the host's share of a step is about as long: turning the plan into tensors, launching,
reading the sampled tokens back, then the scheduler's bookkeeping and the next plan.
One after the other, the device idles while the host works. With overlap on, right
after a step's sampling is queued, before its one host sync, the worker also queues
the step most likely to come next, its *guess*: every sequence decodes the token just
sampled (read on the device, never copied), one position on. The next plan either is
that step, and its results are the ones already computed, or it is that step less the
sequences that left (finished by EOS or a stop, aborted, preempted), and the rest take
their rows of it, or it is anything else, and the guess is dropped. Nothing else
changes: the scheduler does not know guesses exist.

Taking rows of a larger batch is what any change of batch composition does: a row's
logits may differ from a smaller batch's in the last bits (other GEMM tiles), so a
near-tie may break the other way, as it may when a request arrives. With the batch
unchanged the results are the plain path's to the bit.

A dropped guess's only trace is its KV write at each sequence's next position, inside
a block the sequence holds but has not filled: if the sequence goes on, its real step
recomputes that slot first; if it was freed, the block was not full, so it was never
in the prefix cache and its next owner writes before it reads.

A guess is made only where it can be right: every sequence of the step sampled with no
drafts (those that end by max_tokens or max_model_len with it are left out of the
guess, as they will be out of the next plan), each next position lies in a
block the sequence already holds (the scheduler hands out the block of the position
after a sampling run with the run when a block is free: KVCacheInfo.lookahead_slots),
and sampling reads no token history (penalties, min_tokens, a grammar: the token it
would read is still on the device). After a dropped guess the worker makes none for
1, 2, 4 ... 16 steps (doubling while guesses keep missing), so a workload whose
batches keep changing wastes little device time; and none while the scheduler says
the next step may admit a waiting request (a seat and the blocks of its first chunk
are free: StepPlan.admits_next; a queue held back by a full KV cache does not stop
guessing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tandem.engine.plan import SeqPlan, StepPlan
from tandem.engine.seq_state import SeqState

MAX_BACKOFF = 16  # steps without guessing after a run of missed guesses, at most

Queued = TypeVar("Queued")  # the worker's handle on the guessed step's queued work


@dataclass(slots=True)
class Guess(Generic[Queued]):
    """The step queued ahead: what the next plan must be for its results to stand."""

    seq_ids: list[int]
    start_pos: list[int]  # each sequence's next position (its guessed token goes there)
    block_ids: list[int]  # the block holding that position
    follow: list[int]  # their indices in the plan before the guess
    queued: Queued
    token_ids: list[int] = field(default_factory=list)  # the tokens sampled by the step
    # before the guess: the ones the next plan must compute (set once they are known)


class Lookahead(Generic[Queued]):
    """When to guess, and whether a plan is the guess. Counts hits and misses."""

    def __init__(self, enabled: bool, block_size: int, max_model_len: int) -> None:
        """max_model_len: tokens a sequence may hold (the scheduler's limit: also no more
        than the KV cache's blocks hold)."""
        self.enabled = enabled
        # KVCacheInfo.lookahead_slots: with overlap the scheduler gives the block of the
        # position after a sampling run with the run, and both sides keep it
        self.slots = 1 if enabled else 0
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.guess: Guess[Queued] | None = None
        self.num_hits = 0  # plans that were the guess (or the guess less some sequences)
        self.num_partial = 0  # of those, plans less some sequences
        self.num_misses = 0  # guesses dropped
        self._pause = 0  # steps left without guessing
        self._backoff = 1  # the pause after the next miss

    def take(self, plan: StepPlan, states: list[SeqState]) -> tuple[Queued, list[int]] | None:
        """The queued work of the guess and the guess row of each of plan's sequences,
        if `plan` (applied to `states`) is that step, or that step less some sequences
        (finished, aborted, preempted: their rows are left unread); else None, and the
        guess, if any, is dropped."""
        guess, self.guess = self.guess, None
        if guess is None:
            return None
        rows = self._rows(guess, plan, states)
        if rows is not None:
            self.num_hits += 1
            self.num_partial += len(rows) < len(guess.seq_ids)
            self._backoff = 1
            return guess.queued, rows
        self.num_misses += 1
        self._pause = self._backoff
        self._backoff = min(2 * self._backoff, MAX_BACKOFF)
        return None

    def followers(self, plan: StepPlan, states: list[SeqState]) -> list[int] | None:
        """Indices of plan's sequences that the guess after `plan` continues (those
        that do not end by max_tokens or max_model_len with this step), or None: no
        guess this step. Called once per step."""
        if not self.enabled or plan.admits_next:
            return None
        if self._pause:
            self._pause -= 1
            return None
        follow = []
        for i, (p, s) in enumerate(zip(plan.seqs, states, strict=True)):
            pos = p.start_pos + len(p.token_ids)  # the token sampled now goes here next
            if _plain_sample(p) and self._ends(s, pos):
                continue  # out of the next plan (its next block is not needed either)
            if not self._guessable(p, s, pos):
                return None
            follow.append(i)
        return follow or None

    def hold(
        self, plan: StepPlan, states: list[SeqState], follow: list[int], queued: Queued
    ) -> None:
        """Keep the guess queued after `plan`, which continues plan.seqs[follow]."""
        seqs = [plan.seqs[i] for i in follow]
        positions = [p.start_pos + len(p.token_ids) for p in seqs]
        blocks = [
            states[i].block_table[pos // self.block_size]
            for i, pos in zip(follow, positions, strict=True)
        ]
        self.guess = Guess([p.seq_id for p in seqs], positions, blocks, follow, queued)

    def expect(self, token_ids: list[int]) -> None:
        """The tokens this step sampled, one per plan sequence (in order): the next
        plan's inputs, for the sequences the guess continues."""
        if self.guess is not None:
            self.guess.token_ids = [token_ids[i] for i in self.guess.follow]

    def _guessable(self, p: SeqPlan, s: SeqState, pos: int) -> bool:
        """Whether the plan after p can be foreseen for its sequence: it sampled one
        token, whose sampling reads no history, and holds the block of `pos` (kept by
        the next plan, which cuts the table to blocks_for(pos + slots))."""
        if not _plain_sample(p) or not s.history_free:
            return False
        return len(s.block_table) > pos // self.block_size and (
            self.slots > 0 or pos % self.block_size != 0
        )

    def _ends(self, s: SeqState, pos: int) -> bool:
        """Whether the sequence ends by length with the token sampled now (at pos)."""
        num_outputs = pos + 1 - s.num_prompt_tokens
        return num_outputs >= s.sampling.max_tokens or pos + 1 >= self.max_model_len

    def _rows(self, guess: Guess, plan: StepPlan, states: list[SeqState]) -> list[int] | None:
        """The guess row of each of plan's sequences, in order, if each continues its
        guessed sequence as guessed (the guess may hold more); else None."""
        if len(guess.token_ids) != len(guess.seq_ids):
            return None  # the tokens were never known (cannot happen in a worker)
        rows: list[int] = []
        i = 0
        for p, s in zip(plan.seqs, states, strict=True):
            while i < len(guess.seq_ids) and guess.seq_ids[i] != p.seq_id:
                i += 1
            if (
                i == len(guess.seq_ids)
                or p.new is not None
                or p.start_pos != guess.start_pos[i]
                or p.token_ids != [guess.token_ids[i]]
                or not p.sample
                or p.num_draft
                or p.draft_token_ids
                or s.block_table[p.start_pos // self.block_size] != guess.block_ids[i]
            ):
                return None
            rows.append(i)
            i += 1
        return rows or None


def _plain_sample(p: SeqPlan) -> bool:
    """p samples one token: no drafts to verify."""
    return p.sample and not p.num_draft and not p.draft_token_ids

"""The draft-model proposer: a small model that shares the target's KV block ids.

In a step where some sequence has k >= 1, for the plan's sequences in order:

1. one catch-up forward of the draft over every token the target computes this step
   (prefill chunks, decode tokens) plus every confirmed token the draft still lacks
   (the last draft of a window whose drafts were all accepted; tokens of steps in
   which the draft did not run), for every sequence of the plan, those with k = 0
   too, so any of them can start speculating at the next step (unless the plan
   leaves a k = 0 sequence behind, `SeqPlan.draft_catch_up`: the scheduler's
   exploring steps give one sequence one draft and catch up only that one);
2. from that forward's last row, each sampling sequence's first draft (k >= 1) or, for
   k = 0, its probe: the draft the sequence would have got, which the worker compares
   with the token the target samples (acceptance statistics while not speculating);
   after a window whose drafts were all kept, also from the row before: the look-back
   (the draft that window's next position would have got, against its bonus token);
3. k - 1 more one-token forwards for the sequences with k >= 2.

In a step where no sequence speculates the draft does not run at all: at high load
the controller turns speculation off, and keeping the draft's KV current would cost
the step the draft's whole forward (13% of a batch-64 step on a 2-core CPU). Its KV
then falls behind and the next speculating step catches it up, in one forward. A new
sequence catches up from position 0, also over a prefix-cache hit: the cached blocks'
draft KV may never have been written (their owner never speculated), and rewriting
it is cheap (the draft's cost per token is a fraction of the target's) and harmless
(a position's K/V depend only on the tokens up to it, so a shared block gets the
same values again).

Drafts are sampled like the target's tokens, with the same parameters and the same
per-(seed, output position) noise (`SeqState.sample_row`), so for greedy rows the draft
proposes its argmax and for sampled rows the draft and target draws are coupled.
For a constrained sequence (structured output) that row also carries the grammar's
mask after the confirmed outputs and the drafts so far (`SeqState.sample_row` is the
hook), so its drafts stay grammar-valid and get accepted; the proposer knows no grammar.

Example, k = 2, target tokens [.. a b] of which the draft has KV up to a, plan token c
at position 9: the catch-up forward runs [b, c] at positions 8, 9 and samples d1 from
c's row; the next forward runs [d1] at position 10 and samples d2. The draft's KV then
holds positions 0..10; the next plan's start_pos cuts that to what was accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.draft_input import advance, can_advance
from tandem.engine.model_input import ModelInput, RunSeq
from tandem.engine.model_runner import ModelRunner
from tandem.engine.plan import SeqPlan, StepPlan
from tandem.engine.sampler import Sampler, SampleRow, SamplingMetadata
from tandem.engine.seq_state import SeqState


def draft_model_dir(speculative_model: str | None, target_model: str | None) -> str:
    """The draft model to load: the one named, else the built-in draft when the target
    is the built-in model. Raises ValueError when neither applies."""
    if speculative_model is not None:
        return speculative_model
    if target_model is None:
        from tandem.engine.builtin import BUILTIN_DRAFT

        return str(BUILTIN_DRAFT)
    raise ValueError(
        "speculative_method 'draft' needs speculative_model (a draft model directory "
        "sharing the target's tokenizer); the built-in draft pairs only with the built-in target"
    )


@dataclass(slots=True)
class Proposals:
    """What the proposer produced for one step, one entry per plan sequence."""

    drafts: list[list[int]]  # k draft tokens per sequence (empty when k = 0)
    probes: list[int | None]  # k = 0 sampling sequences: the draft the sequence would
    # have got; None elsewhere
    lookbacks: list[bool | None] = dataclasses.field(default_factory=list)  # per
    # sequence: whether the draft, caught up over the one token before this step's
    # token, predicted that token; None where not looked at (see `_catch_up`)


class DraftModelProposer:
    """Runs the draft model: its own weights and KV tensors, the target's block ids."""

    def __init__(
        self,
        config: EngineConfig,
        draft_model: str,
        draft_dtype: str,
        num_blocks: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        """config: the target's; the draft gets its device, block size and seed.
        draft_dtype: see SpeculativeConfig.speculative_dtype. num_blocks, max_model_len,
        vocab_size, eos_token_ids: the target's (the first three are checked against
        the draft)."""
        if draft_dtype == "auto":
            draft_dtype = config.dtype
        draft_config = dataclasses.replace(
            config, model=draft_model, max_model_len=None, dtype=draft_dtype
        )
        self.runner = ModelRunner(draft_config, num_blocks=num_blocks)
        if self.runner.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model {draft_model} has a vocabulary of {self.runner.vocab_size} "
                f"tokens, the target {vocab_size}: they must share one tokenizer"
            )
        if self.runner.max_model_len < max_model_len:
            raise ValueError(
                f"the draft model {draft_model} holds {self.runner.max_model_len} positions, "
                f"fewer than the target's max_model_len={max_model_len}: lower max_model_len"
            )
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids

    def propose(self, plan: StepPlan, states: list[SeqState]) -> Proposals:
        """Drafts for every sequence of `plan` (states: their mirrors, in plan order,
        already corrected by the plan). Writes the draft KV; updates num_draft_computed."""
        seqs = list(zip(plan.seqs, states, strict=True))
        for p in plan.seqs:
            if p.num_draft and not p.sample:
                raise ValueError(f"seq {p.seq_id}: drafts need a sampling step (sample=True)")
        drafts: list[list[int]] = [[] for _ in seqs]
        probes: list[int | None] = [None] * len(seqs)
        lookbacks: list[bool | None] = [None] * len(seqs)
        if not any(p.num_draft for p in plan.seqs):
            return Proposals(drafts, probes, lookbacks)  # nobody speculates: the draft rests
        first, greedy, looked = self._catch_up(seqs)
        for i, tok in first.items():
            if seqs[i][0].num_draft:
                drafts[i].append(tok)
            else:
                probes[i] = tok
        for i, tok in looked.items():
            lookbacks[i] = tok == seqs[i][0].token_ids[0]
        self._draft_steps(seqs, drafts, greedy)
        return Proposals(drafts, probes, lookbacks)

    def _catch_up(
        self, seqs: list[tuple[SeqPlan, SeqState]]
    ) -> tuple[dict[int, int], set[int], dict[int, int]]:
        """The catch-up forward; returns {plan index: first draft or probe} for the
        sequences that sample, the plan indices whose rows are plain greedy, and
        {plan index: look-back draft}.

        A look-back: a decoding sequence whose catch-up starts one token before the
        step's token (after a window whose k drafts were all kept, the draft never saw
        the last one) also samples that row: the draft the sequence would have got for
        the step's token, i.e. draft k + 1 of that window. The scheduler compares it,
        as n-gram compares its proposal's next token with the bonus token, so that a
        position the controller stopped reaching is still observed."""
        run_seqs: list[RunSeq] = []
        rows: list[SampleRow] = []
        row_seq: list[int] = []  # plan index of each row; look-back rows as ~index
        for i, (p, s) in enumerate(seqs):
            if not (p.num_draft or p.draft_catch_up):
                continue  # left behind this step (its num_draft_computed stays)
            start = min(s.num_draft_computed, p.start_pos)
            end = p.start_pos + len(p.token_ids)
            tokens = s.token_ids[start:end]
            look_back = (
                p.sample
                and len(p.token_ids) == 1
                and start == p.start_pos - 1 >= s.num_prompt_tokens
                and s.grammar is None
            )
            logits_from = len(tokens) - 1 - look_back if p.sample else len(tokens)
            run_seqs.append(RunSeq(tokens, start, s.block_table, logits_from))
            s.num_draft_computed = end
            if look_back:
                rows.append(s.sample_row(p.start_pos, [], for_draft=True))
                row_seq.append(~i)
            if p.sample:
                rows.append(s.sample_row(end, [], for_draft=True))
                row_seq.append(i)
        logits = self._forward(run_seqs)
        if not rows:
            return {}, set(), {}
        greedy = {i for i, r in zip(row_seq, rows, strict=True) if i >= 0 and _plain_greedy(r)}
        first: dict[int, int] = {}
        looked: dict[int, int] = {}
        for i, tok in zip(row_seq, self._sample(logits, rows), strict=True):
            if i >= 0:
                first[i] = tok
            else:
                looked[~i] = tok
        return first, greedy, looked

    def _draft_steps(
        self, seqs: list[tuple[SeqPlan, SeqState]], drafts: list[list[int]], greedy: set[int]
    ) -> None:
        """Draft steps 2..max k, one one-token forward each for the sequences with
        k >= j: feed each its last draft, take its next. While every active sequence is
        plain greedy (`greedy`, plan indices) and the active set is unchanged, a step
        reuses the previous step's input (`draft_input.advance`) and its argmax stays on
        the device; those drafts reach the host once, at the end (or before a step
        that needs them)."""
        max_k = max((p.num_draft for p, _ in seqs), default=0)
        inp: ModelInput | None = None
        pending: list[tuple[list[int], torch.Tensor]] = []  # (active, their next drafts)
        prev: list[int] = []
        for j in range(2, max_k + 1):
            active = [i for i, (p, _) in enumerate(seqs) if p.num_draft >= j]
            positions = [seqs[i][0].start_pos + len(seqs[i][0].token_ids) + j - 2 for i in active]
            fast = all(i in greedy for i in active)
            if fast and active == prev and can_advance(inp, positions, self.runner.block_size):
                inp = advance(inp, pending[-1][1])
            else:
                _flush(pending, drafts)
                run_seqs = [
                    RunSeq([drafts[i][-1]], pos, seqs[i][1].block_table, 0)
                    for i, pos in zip(active, positions, strict=True)
                ]
                inp = self.runner.build_input(run_seqs)
            for i, pos in zip(active, positions, strict=True):
                seqs[i][1].num_draft_computed = pos + 1
            logits = self.runner.execute(inp)
            if fast:
                pending.append((active, logits.argmax(-1)))
            else:
                rows = [self._row(seqs[i], drafts[i]) for i in active]
                for i, tok in zip(active, self._sample(logits, rows), strict=True):
                    drafts[i].append(tok)
            prev = active
        _flush(pending, drafts)

    @staticmethod
    def _row(seq: tuple[SeqPlan, SeqState], drafts: list[int]) -> SampleRow:
        p, s = seq
        return s.sample_row(p.start_pos + len(p.token_ids), drafts, for_draft=True)

    def _forward(self, run_seqs: list[RunSeq]) -> torch.Tensor:
        inp = self.runner.build_input(run_seqs)
        return self.runner.execute(inp)

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
        if all(_plain_greedy(r) for r in rows):  # the sampler would take the argmax
            return logits.argmax(-1).tolist()
        meta = SamplingMetadata.build(rows, self.eos_token_ids, logits.shape[-1], logits.device)
        return self.sampler(logits, meta).token_ids.tolist()


def _plain_greedy(row: SampleRow) -> bool:
    """Whether the sampler returns the argmax of this row's raw logits: greedy, and
    nothing edits the logits (penalties, logit bias, min_tokens, a grammar mask)."""
    p = row.params
    return (
        p.greedy
        and row.allowed is None
        and not p.logit_bias
        and p.repetition_penalty == 1
        and not p.frequency_penalty
        and not p.presence_penalty
        and len(row.output_token_ids) >= p.min_tokens
    )


def _flush(pending: list[tuple[list[int], torch.Tensor]], drafts: list[list[int]]) -> None:
    """Append the device-held drafts of `pending` steps to `drafts` (one host sync)."""
    if not pending:
        return
    values = torch.cat([t for _, t in pending]).tolist()
    offset = 0
    for active, _ in pending:
        for i, tok in zip(active, values[offset : offset + len(active)], strict=True):
            drafts[i].append(tok)
        offset += len(active)
    pending.clear()

"""A worker's mirror of one sequence, and the sampler rows it asks for.

Shared by the worker (target verification) and the draft-model proposer, which sample
the same output positions with the same parameters and the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tandem.engine.plan import SamplingParams
from tandem.engine.sampler import SampleRow

if TYPE_CHECKING:  # llguidance is imported only when a request is constrained
    from tandem.engine.structured import GrammarState


@dataclass(slots=True)
class SeqState:
    """A worker's mirror of one sequence, corrected by every plan."""

    token_ids: list[int]  # tokens in the KV cache or being computed this step (drafts of
    # the step included; the next plan cuts them back to its start_pos)
    block_table: list[int]  # KV block ids, in order (target and draft share them)
    sampling: SamplingParams
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt
    seed: int  # the request's seed, or one drawn for it at creation
    carry_logits: torch.Tensor | None = None  # (V,) last prompt-chunk row, for the
    # prompt logprob of the next chunk's first token
    num_draft_computed: int = 0  # leading tokens whose draft-model KV is written (a
    # prefix of the confirmed tokens once cut to the next plan's start_pos)
    draft_params: SamplingParams | None = None  # sampling without logprobs, for drafts
    grammar: GrammarState | None = None  # structured output: the grammar's position,
    # synced to the committed outputs before each mask; None = unconstrained

    @property
    def history_free(self) -> bool:
        """Sampling reads no earlier token: no penalty, no min_tokens, no grammar."""
        return self.grammar is None and not _uses_history(self.sampling)

    def sample_row(self, num_tokens: int, drafts: list[int], for_draft: bool) -> SampleRow:
        """The row that samples the output after token_ids[:num_tokens] + drafts.

        Its noise is that of output position num_tokens + len(drafts) - num_prompt_tokens,
        whatever the drafts are; penalties and min_tokens see the drafts as outputs.
        A constrained sequence's row carries the grammar's mask after the committed
        outputs (token_ids[num_prompt_tokens:num_tokens]) and the drafts."""
        params = self.sampling
        if for_draft:
            if self.draft_params is None:
                self.draft_params = _without_logprobs(self.sampling)
            params = self.draft_params
        prompt: list[int] = []
        outputs: list[int] = []
        if _uses_history(params):  # else the sampler never reads them: skip the copies
            prompt = self.token_ids[: self.num_prompt_tokens]
            outputs = self.token_ids[self.num_prompt_tokens : num_tokens] + drafts
        return SampleRow(
            params=params,
            seed=self.seed,
            output_pos=num_tokens - self.num_prompt_tokens + len(drafts),
            prompt_token_ids=prompt,
            output_token_ids=outputs,
            allowed=self._grammar_mask(num_tokens, drafts),
        )

    def _grammar_mask(self, num_tokens: int, drafts: list[int]) -> bytes | None:
        if self.grammar is None:
            return None
        self.grammar.sync(self.token_ids[self.num_prompt_tokens : num_tokens])
        return self.grammar.bitmask(drafts)

    def cut_drafts(self, num_tokens: int, drafts: list[int]) -> list[int]:
        """`drafts` after token_ids[:num_tokens], cut to the prefix the grammar accepts
        (all of them when unconstrained), so verification never keeps a forbidden one."""
        if self.grammar is None or not drafts:
            return drafts
        self.grammar.sync(self.token_ids[self.num_prompt_tokens : num_tokens])
        return drafts[: self.grammar.valid_prefix(drafts)]


def _uses_history(p: SamplingParams) -> bool:
    """Whether sampling reads the prompt and outputs: penalties and min_tokens do."""
    penalties = p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty
    return bool(penalties or p.min_tokens)


def _without_logprobs(p: SamplingParams) -> SamplingParams:
    if p.logprobs is None and p.prompt_logprobs is None:
        return p
    return SamplingParams(
        **{name: getattr(p, name) for name in SamplingParams.__dataclass_fields__}
        | {"logprobs": None, "prompt_logprobs": None}
    )

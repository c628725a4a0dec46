"""The sampler: one batched pass from logits to tokens (and logprobs) for a step.

For logits (B, V) and a `SamplingMetadata` built once per step, in this order:

1. logits processing (`process_logits`), on the raw logits: repetition penalty
   (HF/CTRL, over prompt + output: l / r if l > 0 else l * r), frequency penalty
   (- f * count in output), presence penalty (- p if in output), logit_bias (added),
   min_tokens (eos and stop ids set to -inf while fewer outputs than min_tokens),
   then the structured-output grammar mask (tokens the grammar forbids set to -inf; if
   that leaves a row nothing, e.g. min_tokens masked eos where the grammar allows only
   eos, the grammar wins: the row becomes uniform over the grammar's tokens);
2. greedy rows (temperature 0): argmax of the processed logits;
3. other rows (`filter_logits`): divide by temperature, then top-k, then top-p (on
   the renormalised top-k distribution; the smallest set with mass >= top_p, the top
   token always kept), then min-p (drop p < min_p * p_max), then sample with Gumbel-max
   noise that is a function of (seed, output position) only (`sampling_noise`), so a
   seeded row's token does not depend on the rest of the batch.

Logprobs are those of the model's own distribution, log_softmax of the raw logits
before penalties, bias and temperature (vLLM's default "raw_logprobs"): what the model
thinks of the token, whatever the request's sampling settings.

Every step is batched tensor work: no Python loop over rows, and work that no row
needs (penalties, noise, sorting, log_softmax) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.plan import TokenLogprobs
from tandem.engine.sampling_filters import filter_logits
from tandem.engine.sampling_metadata import (
    GrammarMask,
    PenaltyTensors,
    RandomRows,
    SampleRow,
    SamplingMetadata,
)
from tandem.engine.sampling_noise import gumbel_noise, uniform_noise

__all__ = [
    "SampleRow",
    "Sampler",
    "HostCopy",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_token_logprobs",
    "filter_logits",
    "process_logits",
    "uniform_noise",
]


@dataclass(slots=True)
class SamplerOutput:
    """Sampled tokens of a step and, when any row asked, their logprobs."""

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32 model logprob of each sampled token;
    # None when no row asked (then so are the three below); rows that did not ask
    # are computed too and dropped by to_token_logprobs
    ranks: torch.Tensor | None  # (B,) int64 1-based rank of each sampled token
    top_ids: torch.Tensor | None  # (B, N) int64, N = max logprobs asked over rows
    top_logprobs: torch.Tensor | None  # (B, N) float32, most likely first

    def to_token_logprobs(self, rows: list[SampleRow]) -> list[TokenLogprobs | None]:
        """Plain data per row: None where the row did not ask, else its own top N."""
        if self.logprobs is None:
            return [None] * len(rows)
        ids = self.token_ids.tolist()
        lps, ranks = self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        out: list[TokenLogprobs | None] = []
        for i, row in enumerate(rows):
            n = row.params.logprobs
            top = None if n is None else list(zip(top_ids[i][:n], top_lps[i][:n], strict=True))
            out.append(None if n is None else TokenLogprobs(ids[i], lps[i], top, ranks[i]))
        return out


@dataclass(slots=True)
class HostCopy:
    """A SamplerOutput on its way to the host: `wait()` returns it there."""

    out: SamplerOutput  # host tensors (pinned, being filled until the event fires)
    event: torch.cuda.Event | None  # recorded after the copies; None: already on the host

    @staticmethod
    def start(out: SamplerOutput) -> HostCopy:
        """Queue out's copy to the host without waiting for the device (CUDA); a CPU
        output is returned as it is."""
        if out.token_ids.device.type != "cuda":
            return HostCopy(out, None)
        tensors = (out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs)
        host = SamplerOutput(
            *(None if t is None else t.to("cpu", non_blocking=True) for t in tensors)
        )
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(out.token_ids.device))  # the copies' stream
        return HostCopy(host, event)

    def wait(self) -> SamplerOutput:
        """The output on the host, once the device has produced and copied it."""
        if self.event is not None:
            self.event.synchronize()
        return self.out


class Sampler:
    """Stateless: all per-step inputs come in `SamplingMetadata`."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: (B, V) of any float dtype; returns tokens (B,) int64 and logprobs."""
        if logits.dim() != 2 or tuple(logits.shape) != (meta.num_rows, meta.vocab_size):
            raise ValueError(
                f"logits must be ({meta.num_rows}, {meta.vocab_size}) for this metadata, "
                f"got {tuple(logits.shape)}"
            )
        logits = logits.to(torch.float32)
        token_ids = sample(process_logits(logits, meta), meta)
        if meta.num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None, None)
        lp, rank, top_ids, top_lp = compute_token_logprobs(logits, token_ids, meta.num_logprobs)
        return SamplerOutput(token_ids, lp, rank, top_ids, top_lp)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Tokens (B,) int64 from processed logits (B, V) float32 (modified in place)."""
    rand = meta.random
    if rand is None:
        return logits.argmax(-1)
    if meta.all_random:
        return _sample_random(logits, rand)
    token_ids = logits.argmax(-1)
    token_ids[rand.rows] = _sample_random(logits[rand.rows], rand)
    return token_ids


def _sample_random(logits: torch.Tensor, rand: RandomRows) -> torch.Tensor:
    """Gumbel-max draws (R,) from the filtered distributions of logits (R, V)."""
    logits = filter_logits(logits.div_(rand.temperature), rand.filters)
    logits += gumbel_noise(rand.key_lo, rand.key_hi, logits.shape[-1])
    return logits.argmax(-1)


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Penalties, logit bias and min_tokens masking: (B, V) float32 -> a new (B, V).

    Always a copy, never the input: the sampler edits the result in place and still
    needs the raw logits for logprobs."""
    logits = logits.clone()
    if meta.penalties is not None:
        pen = meta.penalties
        logits[pen.rows] = apply_penalties(logits[pen.rows], pen)
    if meta.logit_bias is not None:
        b = meta.logit_bias
        logits.index_put_((b.rows, b.cols), b.values, accumulate=True)
    if meta.min_tokens_mask is not None:
        m = meta.min_tokens_mask
        logits[m.rows, m.cols] = m.values
    if meta.grammar is not None:
        g = meta.grammar
        if g.rows.numel() == logits.shape[0]:  # rows are sorted and distinct: all of them
            apply_grammar_mask(logits, g)
        else:
            logits[g.rows] = apply_grammar_mask(logits[g.rows], g)
    return logits


def apply_grammar_mask(logits: torch.Tensor, g: GrammarMask) -> torch.Tensor:
    """-inf where the grammar forbids: logits (G, V) -> the same tensor, edited in
    place. A row left with no finite logit (what the grammar allows was masked before,
    e.g. eos under min_tokens) gets 0 on the grammar's tokens, so it samples among them
    uniformly: the constraint beats min_tokens and bias. No host sync."""
    logits += g.bias
    row_max = logits.amax(-1, keepdim=True)  # (G, 1); -inf: nothing left
    keep = torch.where(row_max == float("-inf"), 0.0, float("-inf"))  # (G, 1)
    return torch.maximum(logits, g.bias + keep, out=logits)


def apply_penalties(logits: torch.Tensor, pen: PenaltyTensors) -> torch.Tensor:
    """Repetition, then frequency and presence penalties on logits (P, V) -> (P, V)."""
    counts = pen.output_counts
    in_output = counts > 0
    if pen.in_prompt is not None:
        seen = pen.in_prompt | in_output
        scaled = torch.where(logits > 0, logits / pen.repetition, logits * pen.repetition)
        logits = torch.where(seen, scaled, logits)
    logits = logits - pen.frequency * counts
    return logits - pen.presence * in_output


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of given tokens under log_softmax(logits), their ranks and the top N.

    logits: (L, V) any float dtype; token_ids: (L,) int64; num_top: N >= 0. Returns
    logprob (L,) float32, rank (L,) int64 (1 + number of strictly more likely tokens),
    top_ids (L, N) int64 and top_logprobs (L, N) float32, most likely first.
    Used for sampled tokens and, by the worker, for prompt logprobs.
    """
    if logits.dim() != 2 or token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (L, V) and token_ids (L,), got {tuple(logits.shape)} and "
            f"{tuple(token_ids.shape)}"
        )
    if num_top < 0:
        raise ValueError(f"num_top must be >= 0, got {num_top}")
    all_lp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    token_lp = all_lp.gather(1, token_ids[:, None].to(torch.int64))  # (L, 1)
    rank = (all_lp > token_lp).sum(-1) + 1
    top_lp, top_ids = all_lp.topk(min(num_top, logits.shape[-1]), dim=-1)
    return token_lp[:, 0], rank, top_ids, top_lp

"""A step's sampling: queued on the device, then read back with the step's one host sync.

`StepSampler.queue` turns a step's logits into sampler rows (each sampling sequence's
verify window: its drafts, then one more), computes prompt logprobs where asked, and
queues the sampler with its outputs' copy to the host; `QueuedSampling.results` waits
for that copy and keeps each sequence's drafts up to the first the target disagrees
with (`verify.coupled_accept`). Between the two the worker may queue more device work
(engine.lookahead's guess of the next step), which is why they are apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from tandem.engine.plan import SeqPlan, SeqResult, StepPlan, TokenLogprobs
from tandem.engine.proposers import Proposals
from tandem.engine.sampler import (
    HostCopy,
    Sampler,
    SamplerOutput,
    SampleRow,
    SamplingMetadata,
    compute_token_logprobs,
)
from tandem.engine.seq_state import SeqState
from tandem.engine.transfer import upload
from tandem.engine.verify import coupled_accept


@dataclass(slots=True)
class QueuedSampling:
    """A step whose sampling is queued on the device: what `results` needs to read it."""

    results: list[SeqResult]  # the step's results, in plan order (sampled ones unfilled)
    sampled: list[tuple[SeqResult, int]]  # (result, plan index) of sampling sequences
    rows: list[SampleRow]  # sampler rows: each sampling sequence's window, in order
    props: Proposals  # the drafts the windows verify, probes and look-backs
    device_out: SamplerOutput | None = None  # the sampler's output on the device
    host: HostCopy | None = None  # its copy to the host
    device_rows: list[int] | None = None  # device_out's row of each plan sequence, when
    # a plan took some rows of a guess (keep); None: row i is plan sequence i

    def keep(self, rows: list[int]) -> None:
        """Only `rows` of this (guessed) step stand: the plan's sequences, in order."""
        if rows != list(range(len(self.results))):
            self.results = [self.results[r] for r in rows]
            self.device_rows = rows

    def start(self, out: SamplerOutput) -> None:
        self.device_out = out
        self.host = HostCopy.start(out)

    def wait_results(self) -> list[SeqResult]:
        """Wait for the step's tokens (the host sync); keep each sequence's drafts up
        to the first that differs from the target's token there, then that token (or
        the bonus)."""
        if self.host is None:
            return self.results
        out = self.host.wait()
        props = self.props
        token_ids = out.token_ids.tolist()
        token_lps = out.to_token_logprobs(self.rows)
        drafts = [props.drafts[i] for _, i in self.sampled]
        starts = list(accumulate((len(d) + 1 for d in drafts), initial=0))
        windows = [token_ids[r : r + len(d) + 1] for r, d in zip(starts, drafts, strict=False)]
        accepted = coupled_accept(windows, drafts)
        for (res, i), r, a in zip(self.sampled, starts, accepted, strict=False):
            res.token_ids = token_ids[r : r + a + 1]
            res.num_accepted_drafts = a
            lps = token_lps[r : r + a + 1]
            res.logprobs = None if lps[0] is None else lps
            if props.probes[i] is not None:
                res.probe_accepted = props.probes[i] == token_ids[r]
            if props.lookbacks:
                res.lookback_accepted = props.lookbacks[i]
        return self.results


class StepSampler:
    """Queues a step's sampling. non_blocking (overlapped decode, CUDA): nothing on the
    way waits for the stream, which may still run queued work."""

    def __init__(self, eos_token_ids: tuple[int, ...]) -> None:
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids

    def queue(
        self, plan: StepPlan, states: list[SeqState], run_seqs, props: Proposals, logits,
        non_blocking: bool = False,
    ) -> QueuedSampling:  # fmt: skip
        """Queue the step's sampling (and compute its prompt logprobs)."""
        rows: list[SampleRow] = []
        row_index: list[int] = []  # logits row of each sample row
        sampled: list[tuple[SeqResult, int]] = []  # (result, plan index) of sampling seqs
        results: list[SeqResult] = []
        offset = 0
        for i, (p, s, rs) in enumerate(zip(plan.seqs, states, run_seqs, strict=True)):
            n_rows = len(rs.token_ids) - rs.logits_from
            result = SeqResult(seq_id=p.seq_id, token_ids=[])
            if rs.logits_from == 0 and s.sampling.prompt_logprobs is not None:
                result.prompt_logprobs = _prompt_logprobs(p, s, logits[offset : offset + n_rows])
            if p.sample:
                drafts = props.drafts[i]
                base = p.start_pos + len(p.token_ids)
                first = offset + n_rows - len(drafts) - 1  # the window's first row
                for j in range(len(drafts) + 1):
                    rows.append(s.sample_row(base, drafts[:j], for_draft=False))
                    row_index.append(first + j)
                sampled.append((result, i))
            if p.sample or result.prompt_logprobs is not None:
                results.append(result)
            offset += n_rows
        queued = QueuedSampling(results, sampled, rows, props)
        if rows:
            if row_index != list(range(logits.shape[0])):  # all rows: no gather
                index = device_index(row_index, logits.device, non_blocking)
                logits = logits.index_select(0, index)
            queued.start(self.sampler(logits, self.metadata(rows, logits, non_blocking)))
        return queued

    def metadata(
        self, rows: list[SampleRow], logits: torch.Tensor, non_blocking: bool
    ) -> SamplingMetadata:
        """The sampler's tensors for rows. With non_blocking, rows that read no history
        (all a guess has) are built on the host and moved without a stream sync; the
        dense penalty and grammar tensors are built where they are used."""
        eos, vocab = self.eos_token_ids, logits.shape[-1]
        history = any(r.prompt_token_ids or r.output_token_ids or r.allowed for r in rows)
        if not non_blocking or history:
            return SamplingMetadata.build(rows, eos, vocab, logits.device)
        return SamplingMetadata.build(rows, eos, vocab, "cpu").to(logits.device)


def device_index(values: list[int], device: torch.device, non_blocking: bool) -> torch.Tensor:
    """values as an int64 index on device; non_blocking (CUDA): without a stream sync."""
    return upload(torch.tensor(values, dtype=torch.int64), device, non_blocking)


def _prompt_logprobs(p: SeqPlan, s: SeqState, rows: torch.Tensor):
    """Logprobs of this chunk's prompt tokens, each given the tokens before it.

    rows[i] holds the logits after token_ids[i]; they score token_ids[i+1]. The
    chunk's first token is scored by the previous chunk's last row (carried)."""
    n_prompt = max(0, min(len(p.token_ids), s.num_prompt_tokens - p.start_pos))
    out: list[TokenLogprobs | None] = []
    num_top = s.sampling.prompt_logprobs or 0
    if n_prompt == 0:
        return out
    if p.start_pos == 0:
        out.append(None)
    else:
        out.extend(_score(s.carry_logits[None], p.token_ids[:1], num_top))
    out.extend(_score(rows[: n_prompt - 1], p.token_ids[1:n_prompt], num_top))
    last = p.start_pos + len(p.token_ids)
    s.carry_logits = rows[len(p.token_ids) - 1].clone() if last < s.num_prompt_tokens else None
    return out


def _score(rows: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, device=rows.device)
    lp, rank, top_ids, top_lp = compute_token_logprobs(rows, ids, num_top)
    lp, rank, top_ids, top_lp = lp.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()
    return [
        TokenLogprobs(t, lp[i], list(zip(top_ids[i], top_lp[i], strict=True)), rank[i])
        for i, t in enumerate(token_ids)
    ]

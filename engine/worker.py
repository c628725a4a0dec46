"""One worker: a mirror of each sequence, the model runner and the sampler.

`Worker.execute(plan)` is: correct the mirrors from the plan, one flattened forward
over every scheduled token, then sample (and compute logprobs) for the rows that
need it. The mirrors never advance on their own: each plan says what to compute.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.model_input import RunSeq, build_model_input
from tandem.engine.model_runner import ModelRunner
from tandem.engine.plan import (
    KVCacheInfo,
    SamplingParams,
    SeqPlan,
    SeqResult,
    StepPlan,
    StepResult,
    TokenLogprobs,
)
from tandem.engine.sampler import Sampler, SampleRow, SamplingMetadata, compute_token_logprobs


@dataclass(slots=True)
class SeqState:
    """A worker's mirror of one sequence, corrected by every plan."""

    token_ids: list[int]  # tokens in the KV cache or being computed this step
    block_table: list[int]  # KV block ids, in order
    sampling: SamplingParams
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt
    seed: int  # the request's seed, or one drawn for it at creation
    carry_logits: torch.Tensor | None = None  # (V,) last prompt-chunk row, for the
    # prompt logprob of the next chunk's first token


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.sampler = Sampler()
        self.seqs: dict[int, SeqState] = {}
        self._seed_rng = random.Random(config.seed)

    @property
    def model_dir(self):
        return self.runner.model_dir

    def kv_cache_info(self) -> KVCacheInfo:
        r = self.runner
        return KVCacheInfo(
            num_blocks=r.num_blocks,
            block_size=r.block_size,
            max_model_len=r.max_model_len,
            eos_token_ids=tuple(r.eos_token_ids),
        )

    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        for seq_id in plan.finished_seq_ids + plan.preempted_seq_ids:
            self.seqs.pop(seq_id, None)
        states = [self._apply(p) for p in plan.seqs]
        run_seqs = [
            RunSeq(p.token_ids, p.start_pos, s.block_table, self._logits_from(p, s))
            for p, s in zip(plan.seqs, states, strict=True)
        ]
        inp = build_model_input(run_seqs, self.runner.block_size, self.runner.device)
        t1 = time.perf_counter()
        logits = self.runner.execute(inp)
        t2 = time.perf_counter()
        results = self._sample(plan, states, run_seqs, logits)
        t3 = time.perf_counter()
        return StepResult(
            step_id=plan.step_id,
            seqs=results,
            target_time_s=t3 - t1,
            phase_times_s={"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2},
        )

    def _apply(self, p: SeqPlan) -> SeqState:
        """Correct the mirror of p's sequence from the plan and return it."""
        if p.new is not None:
            seed = p.new.sampling.seed
            if seed is None:
                seed = self._seed_rng.getrandbits(63)
            state = SeqState(
                list(p.new.prefix_token_ids), [], p.new.sampling, p.new.num_prompt_tokens, seed
            )
            self.seqs[p.seq_id] = state
        else:
            state = self.seqs[p.seq_id]
        if p.start_pos > len(state.token_ids):
            raise ValueError(
                f"seq {p.seq_id}: plan starts at {p.start_pos} but the worker holds "
                f"{len(state.token_ids)} tokens"
            )
        del state.token_ids[p.start_pos :]  # drops rejected drafts, if any
        state.token_ids.extend(p.token_ids)
        state.block_table.extend(p.new_block_ids)
        return state

    @staticmethod
    def _logits_from(p: SeqPlan, s: SeqState) -> int:
        """Index into p.token_ids from which logits are needed."""
        n = len(p.token_ids)
        if s.sampling.prompt_logprobs is not None and p.start_pos < s.num_prompt_tokens:
            return 0
        return n - 1 if p.sample else n

    def _sample(self, plan, states, run_seqs, logits) -> list[SeqResult]:
        rows: list[SampleRow] = []
        row_index: list[int] = []  # logits row of each sample row
        results: list[SeqResult] = []
        offset = 0
        for p, s, rs in zip(plan.seqs, states, run_seqs, strict=True):
            n_rows = len(rs.token_ids) - rs.logits_from
            result = SeqResult(seq_id=p.seq_id, token_ids=[])
            if rs.logits_from == 0 and s.sampling.prompt_logprobs is not None:
                result.prompt_logprobs = self._prompt_logprobs(
                    p, s, logits[offset : offset + n_rows]
                )
            if p.sample:
                rows.append(
                    SampleRow(
                        params=s.sampling,
                        seed=s.seed,
                        output_pos=len(s.token_ids) - s.num_prompt_tokens,
                        prompt_token_ids=s.token_ids[: s.num_prompt_tokens],
                        output_token_ids=s.token_ids[s.num_prompt_tokens :],
                    )
                )
                row_index.append(offset + n_rows - 1)
            if p.sample or result.prompt_logprobs is not None:
                results.append(result)
            offset += n_rows
        if rows:
            self._sample_rows(rows, row_index, logits, results, plan)
        return results

    def _sample_rows(self, rows, row_index, logits, results, plan) -> None:
        meta = SamplingMetadata.build(
            rows, tuple(self.runner.eos_token_ids), logits.shape[-1], logits.device
        )
        out = self.sampler(logits[row_index], meta)
        token_ids = out.token_ids.tolist()
        token_lps = out.to_token_logprobs(rows)
        by_id = {r.seq_id: r for r in results}
        sampled = [p for p in plan.seqs if p.sample]
        for p, tok, lp in zip(sampled, token_ids, token_lps, strict=True):
            res = by_id[p.seq_id]
            res.token_ids = [tok]
            res.logprobs = None if lp is None else [lp]

    def _prompt_logprobs(self, p: SeqPlan, s: SeqState, rows: torch.Tensor):
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
            out.extend(self._score(s.carry_logits[None], p.token_ids[:1], num_top))
        out.extend(self._score(rows[: n_prompt - 1], p.token_ids[1:n_prompt], num_top))
        last = p.start_pos + len(p.token_ids)
        s.carry_logits = rows[len(p.token_ids) - 1].clone() if last < s.num_prompt_tokens else None
        return out

    @staticmethod
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

"""One worker: a mirror of each sequence, the model runner, the draft proposer, the sampler.

`Worker.execute(plan)` is: correct the mirrors from the plan; propose drafts (the draft
model's, or the plan's n-gram drafts); one flattened target forward over every
scheduled token, a sequence with k drafts running a verification window of k+1
tokens; then sample (and compute logprobs) for the rows that need it and keep the
drafts that the target agrees with (`step_sampling`, `verify.coupled_accept`). With
overlapped decode, the guess of the next step is queued between sampling and its host
sync (`engine.lookahead`), and a plan that is the guess (or the guess less some
sequences) skips all of it. The mirrors never
advance on their own: each plan says what to compute, and its start_pos cuts off the
drafts the previous step rejected.

Structured output: a constrained sequence's mirror holds its grammar state
(`tandem.engine.structured`), synced to the committed outputs before each mask; its
drafts are cut to the prefix the grammar accepts, and window row j's mask is computed
after tentatively consuming drafts[:j] (then rolled back).
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

from tandem.engine.config import EngineConfig
from tandem.engine.lookahead import Lookahead
from tandem.engine.model_input import RunSeq
from tandem.engine.model_runner import ModelRunner
from tandem.engine.parallel import ParallelConfig, init_tp_group
from tandem.engine.plan import (
    KVCacheInfo,
    SeqPlan,
    SeqResult,
    StepPlan,
    StepResult,
)
from tandem.engine.platform import detect_platform
from tandem.engine.proposers import DraftModelProposer, Proposals, draft_model_dir
from tandem.engine.seq_state import SeqState
from tandem.engine.spec_config import SpeculativeConfig
from tandem.engine.step_sampling import QueuedSampling, StepSampler, device_index

if TYPE_CHECKING:
    from tandem.engine.structured import GrammarCompiler

logger = logging.getLogger(__name__)

__all__ = ["SeqState", "Worker"]


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        spec: SpeculativeConfig | None = None,
        parallel: ParallelConfig | None = None,
    ) -> None:
        """parallel: this process's tensor-parallel rank (default: one rank). Every rank
        joins the group here, loads its shard of the target and a full draft model, and
        then computes identical logits and samples, so any rank's StepResult is the step's.
        """
        self.config = config
        self.parallel = parallel or ParallelConfig()
        self.tp_group = init_tp_group(self.parallel, detect_platform(config.device).device)
        try:
            self.runner = ModelRunner(config, tp=self.tp_group)
        except BaseException:
            self.tp_group.destroy()  # leave no process group behind a failed start
            raise
        self.step_sampler = StepSampler(tuple(self.runner.eos_token_ids))
        self.seqs: dict[int, SeqState] = {}
        self._seed_rng = random.Random(config.seed)
        self._grammars: GrammarCompiler | None = None  # built at the first constraint
        self.proposer: DraftModelProposer | None = None
        if spec is not None and spec.uses_draft_model:
            r = self.runner
            self.proposer = DraftModelProposer(
                config,
                draft_model_dir(spec.speculative_model, config.model),
                spec.speculative_dtype,
                num_blocks=r.num_blocks,
                max_model_len=r.max_model_len,
                vocab_size=r.vocab_size,
                eos_token_ids=tuple(r.eos_token_ids),
            )
        r = self.runner
        self.lookahead: Lookahead[QueuedSampling] = Lookahead(
            self._overlap_decode(),
            r.block_size,
            min(r.max_model_len, r.num_blocks * r.block_size),  # the scheduler's limit
        )
        self.lookahead_slots = self.lookahead.slots  # KVCacheInfo.lookahead_slots

    def _overlap_decode(self) -> bool:
        """config.overlap_decode where it can run (logged where it cannot)."""
        if not self.config.overlap_decode:
            return False
        refusals = []
        if self.proposer is not None:
            refusals.append("a draft model proposes in the engine")
        if self.tp_group.world_size > 1:
            refusals.append(f"tensor parallel (size {self.tp_group.world_size})")
        if refusals:
            logger.info("overlap_decode off: %s", "; ".join(refusals))
            return False
        if self.runner.device.type != "cuda":
            logger.info(
                "overlap_decode on %s: guesses run in turn, nothing overlaps", self.runner.device
            )
        return True

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
            vocab_size=r.vocab_size,
            lookahead_slots=self.lookahead_slots,
        )

    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        for seq_id in plan.finished_seq_ids + plan.preempted_seq_ids:
            self.seqs.pop(seq_id, None)
        states = [self._apply(p) for p in plan.seqs]
        held = self.lookahead.guess is not None
        taken = self.lookahead.take(plan, states)  # this very step, queued last step
        t1 = t2 = t3 = t4 = time.perf_counter()
        if taken is not None:
            queued, rows = taken
            queued.keep(rows)
        else:
            props = self._cut_drafts(plan, states, self._propose(plan, states))
            t2 = time.perf_counter()
            run_seqs = []
            for p, s, drafts in zip(plan.seqs, states, props.drafts, strict=True):
                logits_from = self._logits_from(p, s)
                run_seqs.append(
                    RunSeq(p.token_ids + drafts, p.start_pos, s.block_table, logits_from)
                )
                s.token_ids.extend(drafts)
            # with overlap, no upload waits for the stream (it may still run a dropped guess)
            inp = self.runner.build_input(run_seqs, non_blocking=self.lookahead.enabled)
            t3 = time.perf_counter()
            logits = self.runner.execute(inp)
            t4 = time.perf_counter()
            queued = self.step_sampler.queue(
                plan, states, run_seqs, props, logits, non_blocking=self.lookahead.enabled
            )
        follow = self.lookahead.followers(plan, states)
        if follow is not None:
            guess = self._queue_guess(plan, states, follow, queued)
            self.lookahead.hold(plan, states, follow, guess)
        results = queued.wait_results()  # the step's one host sync
        if follow is not None:  # then every sequence sampled: results are in plan order
            self.lookahead.expect([r.token_ids[0] for r in results])
        t5 = time.perf_counter()
        return StepResult(
            step_id=plan.step_id,
            seqs=results,
            draft_time_s=t2 - t1,
            target_time_s=t5 - t3,
            phase_times_s={
                "prepare": (t1 - t0) + (t3 - t2),
                "draft": t2 - t1,
                "forward": t4 - t3,
                "sample": t5 - t4,
            },
            overlap=("taken" if taken is not None else "dropped") if held else None,
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
            if p.new.sampling.structured is not None:
                state.grammar = self._grammar_compiler().new_state(p.new.sampling.structured)
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
        keep = -(-(p.start_pos + self.lookahead_slots) // self.runner.block_size)
        del state.block_table[keep:]  # ditto, blocks (see KVCacheInfo.lookahead_slots)
        state.block_table.extend(p.new_block_ids)
        return state

    def _propose(self, plan: StepPlan, states: list[SeqState]) -> Proposals:
        """Drafts per sequence: the draft model's, or those the plan carries (n-gram)."""
        for p in plan.seqs:
            if p.num_draft < 0 or (p.num_draft and not p.sample):
                raise ValueError(f"seq {p.seq_id}: num_draft={p.num_draft} needs sample=True")
            sent = len(p.draft_token_ids)
            if self.proposer is not None and sent:
                raise ValueError(
                    f"seq {p.seq_id}: the plan sends drafts, but this worker proposes its own "
                    "with a draft model"
                )
            if self.proposer is None and sent != p.num_draft:
                raise ValueError(
                    f"seq {p.seq_id}: num_draft={p.num_draft} but the plan sends {sent} drafts "
                    "and this worker has no draft model"
                )
        if self.proposer is not None:
            return self.proposer.propose(plan, states)
        return Proposals([list(p.draft_token_ids) for p in plan.seqs], [None] * len(plan.seqs))

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            # llguidance is imported at the first constraint: the engine runs without it
            from tandem.engine.structured import GrammarCompiler, load_ll_tokenizer

            r = self.runner
            tok = load_ll_tokenizer(r.model_dir, r.vocab_size, tuple(r.eos_token_ids))
            self._grammars = GrammarCompiler(tok, r.vocab_size)
        return self._grammars

    @staticmethod
    def _cut_drafts(plan: StepPlan, states: list[SeqState], props: Proposals) -> Proposals:
        """Constrained sequences keep only the drafts their grammar accepts (n-gram
        drafts may break it; a draft model's are sampled under the mask, past eos too)."""
        props.drafts = [
            s.cut_drafts(p.start_pos + len(p.token_ids), d)
            for p, s, d in zip(plan.seqs, states, props.drafts, strict=True)
        ]
        return props

    @staticmethod
    def _logits_from(p: SeqPlan, s: SeqState) -> int:
        """Index into p.token_ids (+ drafts) from which logits are needed."""
        n = len(p.token_ids)
        if s.sampling.prompt_logprobs is not None and p.start_pos < s.num_prompt_tokens:
            return 0
        return n - 1 if p.sample else n

    def _queue_guess(
        self, plan: StepPlan, states: list[SeqState], follow: list[int], step: QueuedSampling
    ) -> QueuedSampling:
        """Queue the step that most likely follows `plan` (see engine.lookahead): each
        sequence of plan.seqs[follow] decodes the token `step` sampled for it, read on
        the device, one position on. No host sync: inputs go through pinned memory."""
        seqs = [(plan.seqs[i], states[i]) for i in follow]
        positions = [p.start_pos + len(p.token_ids) for p, _ in seqs]
        run_seqs = [
            RunSeq([0], pos, s.block_table, 0) for pos, (_, s) in zip(positions, seqs, strict=True)
        ]
        inp = self.runner.build_input(run_seqs, non_blocking=True)
        token_ids = step.device_out.token_ids  # one per row: k = 0 everywhere
        index = follow if step.device_rows is None else [step.device_rows[i] for i in follow]
        if index != list(range(len(token_ids))):
            token_ids = token_ids.index_select(0, device_index(index, token_ids.device, True))
        inp.input_ids = token_ids
        logits = self.runner.execute(inp)
        rows = [
            s.sample_row(pos + 1, [], for_draft=False)
            for pos, (_, s) in zip(positions, seqs, strict=True)
        ]
        meta = self.step_sampler.metadata(rows, logits, non_blocking=True)
        results = [SeqResult(seq_id=p.seq_id, token_ids=[]) for p, _ in seqs]
        n = len(seqs)
        guess = QueuedSampling(
            results,
            list(zip(results, range(n), strict=True)),
            rows,
            Proposals([[] for _ in range(n)], [None] * n),
        )
        guess.start(self.step_sampler.sampler(logits, meta))
        return guess

"""The scheduler: which tokens of which requests each step computes.

Each step fills a token budget (SARATHI-style stall-free batching):

1. running requests one token behind (decodes: the last sampled token + k drafts),
2. running requests further behind (prompt chunks, recomputation after a preemption),
3. waiting requests, first come first served, with their first chunk.

So a long prompt is computed over several steps while every running decode still
advances each step. Blocks are allocated as tokens are scheduled; when they run out,
the most recently arrived running request is preempted (its blocks freed, recomputed
from scratch later). Full blocks are offered to the prefix cache once computed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.engine.plan import KVCacheInfo, NewSeq, SeqPlan, SeqResult, StepPlan, StepResult
from tandem.engine.spec_config import SpeculativeConfig
from tandem.engine.structured import check_structured_cached
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.kv_blocks import BlockPool, BlockPoolStats, HashFn, default_block_hash
from tandem.scheduler.request import GenerateRequest, Request, RequestOutput, RequestStatus
from tandem.scheduler.request_blocks import (
    prefix_hits,
    register_full_blocks,
    reserve_ahead,
    trim_blocks,
)
from tandem.scheduler.speculation import SpecPlanner
from tandem.scheduler.stats import SpecStats


class QueueFullError(RuntimeError):
    """The waiting queue holds max_queued_requests already (the server answers 429)."""


@dataclass(slots=True)
class SchedulerStats:
    """A snapshot for metrics."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # all time
    kv: BlockPoolStats
    spec: SpecStats | None = None  # speculation counters; None when speculation is off


@dataclass(slots=True)
class TokenSplit:
    """What a plan's tokens are, for step statistics."""

    num_prefill_tokens: int  # prompt chunks and recomputed tokens
    num_decode_tokens: int  # one last-sampled token per decoding sequence
    num_draft_tokens: int  # speculative tokens to verify


@dataclass(slots=True)
class _Step:
    """A plan under construction."""

    budget: int  # tokens left in this step's budget
    seqs: dict[int, SeqPlan] = field(default_factory=dict)  # seq id -> plan, in order
    num_preempted: int = 0  # preemptions while planning this step

    def add(self, plan: SeqPlan) -> None:
        self.seqs[plan.seq_id] = plan
        self.budget -= len(plan.token_ids) + plan.num_draft

    def drop(self, seq_id: int) -> None:
        plan = self.seqs.pop(seq_id, None)
        if plan is not None:
            self.budget += len(plan.token_ids) + plan.num_draft


class Scheduler:
    """Plans steps and applies their results. Single-threaded: one owner calls it."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheInfo,
        hash_fn: HashFn = default_block_hash,
        clock: Callable[[], float] = time.monotonic,
        spec: SpeculativeConfig | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.pool = BlockPool(kv.num_blocks, kv.block_size, config.enable_prefix_caching, hash_fn)
        self.clock = clock
        # a sequence ends ("length") at max_model_len or when it would outgrow the pool
        self.max_len = min(kv.max_model_len, kv.num_blocks * kv.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._by_seq: dict[int, Request] = {}
        self._next_seq_id = 0
        self._next_step_id = 0
        self._finished_seq_ids: list[int] = []  # for the next plan that has seqs
        self._preempted_seq_ids: list[int] = []  # likewise
        self._pending_outputs: list[RequestOutput] = []  # finished inside schedule()
        self._num_preemptions = 0
        self.spec: SpecPlanner | None = None  # k per decode, n-gram drafts, statistics
        if spec is not None and spec.enabled:
            self.spec = SpecPlanner(spec, self.pool, self.max_len)

    # ---- requests in and out -------------------------------------------------------

    def check_request(self, req: GenerateRequest) -> None:
        """Raise ValueError if req can never run. Reads only immutable state (thread-safe)."""
        n = len(req.prompt_token_ids)
        limit = self.kv.max_model_len - 1
        if n > limit:
            raise ValueError(
                f"request {req.request_id}: the prompt has {n} tokens, but the model holds "
                f"{self.kv.max_model_len} tokens (prompt + at least one output), so prompts "
                f"may have at most {limit}"
            )
        need = self.pool.blocks_for(n + 1)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"request {req.request_id}: the prompt needs {need} KV blocks of "
                f"{self.kv.block_size} tokens, the KV cache has only {self.kv.num_blocks}"
            )
        if req.sampling.structured is not None:
            # the server checked already (a 400); offline and direct callers meet it here,
            # before a bad constraint could fail a whole step in the worker
            check_structured_cached(req.sampling.structured)

    def can_admit(self) -> bool:
        """Whether the waiting queue has room for one more request."""
        return len(self.waiting) < self.config.max_queued_requests

    def add_request(self, req: GenerateRequest) -> None:
        """Queue a request. Raises ValueError (bad or duplicate) or QueueFullError."""
        self.check_request(req)
        if req.request_id in self._requests:
            raise ValueError(f"request {req.request_id} is already running")
        if not self.can_admit():
            raise QueueFullError(
                f"{len(self.waiting)} requests are waiting already "
                f"(max_queued_requests={self.config.max_queued_requests})"
            )
        r = Request(
            request_id=req.request_id,
            seq_id=self._next_seq_id,
            sampling=req.sampling,
            token_ids=list(req.prompt_token_ids),
            num_prompt_tokens=len(req.prompt_token_ids),
            arrival_time=req.arrival_time,
            max_draft_tokens=req.max_draft_tokens,
        )
        self._next_seq_id += 1
        self._requests[r.request_id] = r
        self._by_seq[r.seq_id] = r
        self.waiting.append(r)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request as aborted and free its blocks; its final output, or None if
        it is unknown or finished already."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._pending_outputs)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self._num_preemptions,
            kv=self.pool.stats(),
            spec=self.spec.stats() if self.spec is not None else None,
        )

    # ---- schedule ------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan one step: decodes first, then running chunks, then admissions.

        Finished and preempted seq ids ride on the next plan that has seqs, so an
        executor never sees an empty step."""
        step = _Step(budget=self.config.max_num_batched_tokens)
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1]
        chunks = [r for r in self.running if r.num_uncomputed_tokens > 1]
        for req in decodes + chunks:
            if req.status == RequestStatus.RUNNING:
                self._schedule_running(req, step)
        # after a preemption, admitting would only thrash (the victim is first in line)
        while self._can_admit_more(step) and self._admit(self.waiting[0], step):
            self.waiting.popleft()
        if self.spec is not None:  # drafts take what the budget has left
            step.budget -= self.spec.plan_drafts(
                self._next_step_id, step.seqs, decodes, step.budget, self._by_seq
            )
        if self.kv.lookahead_slots:  # last: from what the step left free
            for sp in step.seqs.values():
                if sp.sample:
                    req, end = self._by_seq[sp.seq_id], sp.start_pos + len(sp.token_ids)
                    sp.new_block_ids += reserve_ahead(self.pool, req, end, self.kv, self.max_len)
        plan = StepPlan(step_id=self._next_step_id, seqs=list(step.seqs.values()))
        # only an engine that guesses (it declared lookahead slots) reads the hint, which
        # costs a prefix-cache lookup of the queue's head every step
        plan.admits_next = bool(self.kv.lookahead_slots) and self._may_admit_next()
        self._next_step_id += 1
        if plan.seqs:
            plan.finished_seq_ids, self._finished_seq_ids = self._finished_seq_ids, []
            plan.preempted_seq_ids, self._preempted_seq_ids = self._preempted_seq_ids, []
        return plan

    def _chunk_len(self, req: Request, start: int, budget: int) -> int:
        """Tokens of req to compute this step, from position `start`."""
        n = min(len(req.token_ids) - start, budget)
        threshold = self.config.long_prefill_token_threshold
        return min(n, threshold) if threshold else n

    def _schedule_running(self, req: Request, step: _Step) -> None:
        n = self._chunk_len(req, req.num_computed_tokens, step.budget)
        if n <= 0:
            return
        need = self.pool.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
        if not self._make_room(req, need, step):
            return
        start = req.num_computed_tokens
        new_blocks = self.pool.allocate(need)
        req.block_ids.extend(new_blocks)
        step.add(
            SeqPlan(
                seq_id=req.seq_id,
                token_ids=req.token_ids[start : start + n],
                start_pos=start,
                new_block_ids=new_blocks,
                sample=start + n == len(req.token_ids),
            )
        )

    def _make_room(self, req: Request, need: int, step: _Step) -> bool:
        """Preempt the newest running requests until `need` blocks are free; False if req
        itself was preempted (or, as a safety net, finished: it alone outgrew the pool,
        which `max_len` should prevent)."""
        while self.pool.num_free_blocks < need:
            if self.running == [req]:
                self._pending_outputs.append(self._finish(req, RequestStatus.FINISHED_LENGTH))
                return False
            victim = max(self.running, key=lambda r: (r.arrival_time, r.seq_id))
            self._preempt(victim, step)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, step: _Step) -> None:
        """Preemption by recompute: free everything, requeue at the front."""
        step.drop(req.seq_id)
        step.num_preempted += 1
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        if not req.prompt_logprobs_sent:
            req.prompt_logprobs.clear()  # they are recomputed from the first chunk
        self._num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        self._preempted_seq_ids.append(req.seq_id)
        req.on_worker = False

    def _can_admit_more(self, step: _Step) -> bool:
        return (
            bool(self.waiting)
            and step.num_preempted == 0
            and step.budget > 0
            and len(self.running) < self.config.max_num_seqs
        )

    def _may_admit_next(self) -> bool:
        """Whether the next step may admit the head of the queue (StepPlan.admits_next):
        a seat is free, and so are the blocks of the first chunk it would get beside a
        decode of every running request (the step an engine would guess; with lookahead
        slots those decodes take no new blocks). Requests finishing may free more, but
        they change the next plan anyway."""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        budget = self.config.max_num_batched_tokens - len(self.running)
        return budget > 0 and self._first_chunk(self.waiting[0], budget, record=False) is not None

    def _first_chunk(
        self, req: Request, budget: int, record: bool = True
    ) -> tuple[list[int], int, int] | None:
        """req's prefix-cache hits, its first chunk's length within `budget` tokens and
        the new blocks that chunk needs, if they are free now; else None."""
        hits = prefix_hits(self.pool, req, record)
        n = self._chunk_len(req, len(hits) * self.pool.block_size, budget)
        need = self.pool.blocks_for(len(hits) * self.pool.block_size + n) - len(hits)
        if self.pool.num_free_blocks - self.pool.num_free_among(hits) < need:
            return None
        return hits, n, need

    def _admit(self, req: Request, step: _Step) -> bool:
        """Start (or restart) req with its first chunk after its prefix-cache hit; False
        if its blocks do not fit now (admission stops: first come, first served)."""
        first = self._first_chunk(req, step.budget)
        if first is None:
            return False
        hits, n, need = first
        num_cached = len(hits) * self.pool.block_size
        self.pool.touch(hits)
        req.block_ids = hits + self.pool.allocate(need)
        req.num_computed_tokens = num_cached
        req.num_registered_blocks = len(hits)
        req.status = RequestStatus.RUNNING
        req.on_worker = True
        if req.first_scheduled_time is None:
            req.first_scheduled_time = self.clock()
            req.num_cached_tokens = num_cached
        self.running.append(req)
        new = NewSeq(req.sampling, req.num_prompt_tokens, req.token_ids[:num_cached])
        step.add(
            SeqPlan(
                seq_id=req.seq_id,
                token_ids=req.token_ids[num_cached : num_cached + n],
                start_pos=num_cached,
                new_block_ids=list(req.block_ids),
                sample=num_cached + n == len(req.token_ids),
                new=new,
            )
        )
        return True

    # ---- update --------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Apply a step's results: advance computed tokens, append samples, finish.

        Returns one output per request with news (new tokens, or its end)."""
        if result.step_id != plan.step_id:
            raise ValueError(f"result of step {result.step_id} given for step {plan.step_id}")
        outputs, self._pending_outputs = self._pending_outputs, []
        results = {r.seq_id: r for r in result.seqs}
        for sp in plan.seqs:
            req = self._by_seq.get(sp.seq_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # finished (aborted) since the plan was made
            out = self._update_one(req, sp, results.get(sp.seq_id))
            if out is not None:
                outputs.append(out)
        return outputs

    def _update_one(self, req: Request, sp: SeqPlan, res: SeqResult | None) -> RequestOutput | None:
        if res is not None and res.prompt_logprobs:
            req.add_prompt_logprobs(res.prompt_logprobs)
        num_accepted = res.num_accepted_drafts if res is not None else 0
        if not 0 <= num_accepted <= sp.num_draft:
            raise RuntimeError(f"seq {sp.seq_id}: {num_accepted} of {sp.num_draft} drafts accepted")
        req.num_computed_tokens += len(sp.token_ids) + num_accepted
        if not sp.sample:
            register_full_blocks(self.pool, req)
            return None
        if res is None or len(res.token_ids) != num_accepted + 1:
            raise RuntimeError(
                f"seq {sp.seq_id} was planned to sample but the executor returned "
                f"{0 if res is None else len(res.token_ids)} tokens for {num_accepted} "
                "accepted drafts"
            )
        if req.first_token_time is None:
            req.first_token_time = self.clock()
        if self.spec is not None:
            self.spec.on_result(req, sp, res)
        taken = req.append_outputs(res.token_ids, self.kv.eos_token_ids, self.max_len)
        req.num_computed_tokens = min(req.num_computed_tokens, len(req.token_ids))
        want_lps = req.sampling.logprobs is not None and res.logprobs is not None
        new_lps = res.logprobs[:taken] if want_lps and res.logprobs is not None else None
        if req.status.is_finished:
            req.finished_time = self.clock()
            self._release(req)
        else:
            trim_blocks(self.pool, req, self.kv.lookahead_slots)
            register_full_blocks(self.pool, req)
        return req.make_output(res.token_ids[:taken], new_lps)

    def _finish(self, req: Request, status: RequestStatus) -> RequestOutput:
        req.status = status
        req.finished_time = self.clock()
        self._release(req)
        return req.make_output([], None)

    def _release(self, req: Request) -> None:
        """Forget a finished request: free its blocks, tell the workers."""
        self.pool.free(req.block_ids)
        req.block_ids = []
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        del self._requests[req.request_id]
        del self._by_seq[req.seq_id]
        if req.on_worker:
            self._finished_seq_ids.append(req.seq_id)
            req.on_worker = False

    # ---- statistics ----------------------------------------------------------------

    def record_step(self, plan: StepPlan, result: StepResult, step_time_s: float) -> None:
        """A step's measured wall time (schedule + execute + update), for the cost model."""
        if self.spec is not None:
            self.spec.on_step(plan, result, step_time_s, self._by_seq)

    def token_split(self, plan: StepPlan) -> TokenSplit:
        """Classify a plan's tokens; call it between schedule() and update()."""
        prefill = decode = draft = 0
        for sp in plan.seqs:
            draft += sp.num_draft
            req = self._by_seq[sp.seq_id]
            if sp.sample and len(sp.token_ids) == 1 and sp.start_pos >= req.num_prompt_tokens:
                decode += 1
            else:
                prefill += len(sp.token_ids)
        return TokenSplit(prefill, decode, draft)

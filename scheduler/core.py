"""The engine core: the step loop body, schedule -> execute -> update.

Single-threaded: one owner (the EngineLoop thread, or a test, or the offline LLM)
calls every method except `check_request`, `stats` and `kv`, which are safe from any
thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.engine.plan import Executor, KVCacheInfo, StepPlan, StepResult
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.kv_blocks import HashFn, default_block_hash
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import Scheduler, SchedulerStats, TokenSplit
from tandem.scheduler.stats import StepStats, StepStatsRecorder, StepTotals
from tandem.scheduler.warm_up import warm_up


@dataclass(slots=True)
class EngineStats:
    """A snapshot for metrics: the queues and KV cache now, and the steps so far."""

    scheduler: SchedulerStats
    steps: StepTotals


class EngineCore:
    """Runs steps of the scheduler against an executor."""

    def __init__(
        self,
        config: SchedulerConfig,
        executor: Executor,
        hash_fn: HashFn = default_block_hash,
        clock: Callable[[], float] = time.monotonic,
        stats_history: int = 256,
        spec: SpeculativeConfig | None = None,
        step_timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        """spec: speculative decoding, the same config the executor got (its draft
        model proposes in the engine; n-gram drafts and k are chosen here).
        step_timer: the clock (seconds) that step and execute times are measured with;
        they feed the speculation cost model (tests pass a synthetic one)."""
        self.config = config
        self.step_timer = step_timer
        self.executor = executor
        self.kv: KVCacheInfo = executor.kv_cache_info()
        self.scheduler = Scheduler(config, self.kv, hash_fn=hash_fn, clock=clock, spec=spec)
        self.step_stats = StepStatsRecorder(stats_history)
        self._stats_history = stats_history

    def warm_up(self) -> float:
        """Run the start-up warm-up (scheduler/warm_up.py) before the first request:
        first-time costs are paid and the speculation cost model is calibrated.
        Returns its seconds (0 where it was skipped)."""
        return warm_up(self)

    def reset_step_stats(self) -> None:
        """Forget the recorded steps (after the warm-up)."""
        self.step_stats = StepStatsRecorder(self._stats_history)

    def step(self) -> list[RequestOutput]:
        """One step; returns an output per request with news."""
        t0 = self.step_timer()
        plan = self.scheduler.schedule()
        split = self.scheduler.token_split(plan)
        result, execute_time = self._execute(plan)
        outputs = self.scheduler.update(plan, result)
        if plan.seqs:
            step_time = self.step_timer() - t0
            self.scheduler.record_step(plan, result, step_time)
            self._record(plan, result, split, outputs, step_time, execute_time)
        return outputs

    def _execute(self, plan: StepPlan) -> tuple[StepResult, float]:
        """Run the plan; a plan without seqs (everything finished in schedule) is not sent."""
        if not plan.seqs:
            return StepResult(step_id=plan.step_id, seqs=[]), 0.0
        t0 = self.step_timer()
        result = self.executor.execute(plan)
        return result, self.step_timer() - t0

    def _record(
        self,
        plan: StepPlan,
        result: StepResult,
        split: TokenSplit,
        outputs: list[RequestOutput],
        step_time: float,
        execute_time: float,
    ) -> None:
        sched = self.scheduler
        self.step_stats.record(
            StepStats(
                step_id=plan.step_id,
                num_seqs=len(plan.seqs),
                num_prefill_tokens=split.num_prefill_tokens,
                num_decode_tokens=split.num_decode_tokens,
                num_draft_tokens=split.num_draft_tokens,
                num_accepted_drafts=sum(r.num_accepted_drafts for r in result.seqs),
                num_sampled_tokens=sum(len(r.token_ids) for r in result.seqs),
                num_outputs=len(outputs),
                step_time_s=step_time,
                execute_time_s=execute_time,
                draft_time_s=result.draft_time_s,
                target_time_s=result.target_time_s,
                kv_usage=sched.pool.usage,
                num_running=sched.num_running,
                num_waiting=sched.num_waiting,
                overlap=result.overlap,
            )
        )

    def check_request(self, req: GenerateRequest) -> None:
        """Raise ValueError if req can never run (thread-safe)."""
        self.scheduler.check_request(req)

    def add_request(self, req: GenerateRequest) -> None:
        """Queue req; raises ValueError or QueueFullError."""
        self.scheduler.add_request(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request; its final output, or None if it is not live."""
        return self.scheduler.abort_request(request_id)

    def can_admit(self) -> bool:
        return self.scheduler.can_admit()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def stats(self) -> EngineStats:
        return EngineStats(scheduler=self.scheduler.stats(), steps=self.step_stats.snapshot())

    def shutdown(self) -> None:
        self.executor.shutdown()

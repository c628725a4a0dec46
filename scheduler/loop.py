"""The serving loop: the engine core off the event loop, an async interface for the server.

    loop = EngineLoop(core)            # or ProcessEngineLoop (the core in a child process)
    loop.start()                       # from the event loop (e.g. the app's lifespan)
    async for out in loop.generate(GenerateRequest("r1", [1, 2, 3], SamplingParams())):
        ...                            # one RequestOutput per step with news; the last
                                       # has finished=True
    loop.shutdown(timeout=10)

`ServingLoop` is what the server needs from either loop. `EngineLoop` runs the core in
a thread of this process: the event loop adds and aborts requests through an inbox
under a lock; the engine thread drains it at the start of each step, steps the core,
and hands the step's outputs back in ONE `call_soon_threadsafe`, which spreads them
over per-request asyncio queues. With nothing to do the engine thread sleeps on a
condition. If a step raises, every in-flight request gets a final error output and
the loop is dead (`alive` is False); nothing hangs.

Admission is exact: `num_waiting` counts requests still in the inbox or being handed
to the core, so `can_admit()` never lets one more through than the core will take.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Protocol

from tandem.engine.plan import KVCacheInfo
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore, EngineStats
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import QueueFullError
from tandem.scheduler.streams import (
    Abort,
    EngineDeadError,
    Frontend,
    Op,
    StepOutputs,
    apply_op,
)

__all__ = ["EngineDeadError", "EngineLoop", "ServingLoop", "queue_full_error"]

logger = logging.getLogger(__name__)


class ServingLoop(Protocol):
    """What the server needs from a serving loop (`EngineLoop`, `ProcessEngineLoop`)."""

    @property
    def kv(self) -> KVCacheInfo: ...  # the engine's KV cache: block size, max_model_len

    @property
    def config(self) -> SchedulerConfig: ...

    @property
    def alive(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def can_admit(self) -> bool: ...

    def check_request(self, req: GenerateRequest) -> None: ...

    def stats(self) -> EngineStats: ...

    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> None: ...

    def shutdown(self, timeout: float = 10.0) -> bool: ...

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...


def queue_full_error(config: SchedulerConfig) -> QueueFullError:
    return QueueFullError(
        f"the waiting queue is full (max_queued_requests={config.max_queued_requests})"
    )


class EngineLoop:
    """Runs an EngineCore in a dedicated thread; async generate() per request."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._cond = threading.Condition()
        self._inbox: list[Op] = []  # guarded by _cond
        self._num_pending_adds = 0  # GenerateRequests posted and not yet handed to the
        # core (in _inbox, or taken by the engine thread); guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._front = Frontend(self._post_op, self.abort)
        self._executor_shut_down = False

    # ---- lifecycle -----------------------------------------------------------------

    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs are delivered on `event_loop` (default: the
        running one, so call this from async code or pass the loop)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop was started already")
        self._front.bind(event_loop)
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the engine thread; fail requests still in flight; shut the executor down
        if the thread stopped in time. Returns whether it did."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        self._front.fail("the engine loop was shut down")
        if stopped and not self._executor_shut_down:
            self._executor_shut_down = True
            self.core.shutdown()
        return stopped

    # ---- state ---------------------------------------------------------------------

    @property
    def kv(self) -> KVCacheInfo:
        return self.core.kv

    @property
    def config(self) -> SchedulerConfig:
        return self.core.config

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._front.error is None

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self.core.num_waiting + self._num_pending_adds

    def can_admit(self) -> bool:
        """Whether one more request fits in the waiting queue (else: 429)."""
        return self.num_waiting < self.core.config.max_queued_requests

    def check_request(self, req: GenerateRequest) -> None:
        """Raise ValueError if req can never run (thread-safe)."""
        self.core.check_request(req)

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- the async interface (event-loop thread) ------------------------------------

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit req and yield its outputs until the finished one.

        Raises ValueError (the request can never run, or its id is live already),
        QueueFullError, or EngineDeadError, before anything is yielded. If the
        consumer stops early or is cancelled, the request is aborted in the engine."""
        return self._front.generate(req, lambda: self.alive, self._check_submit)

    def _check_submit(self, req: GenerateRequest) -> None:
        self.core.check_request(req)
        if not self.can_admit():
            raise queue_full_error(self.core.config)

    def abort(self, request_id: str) -> None:
        """Abort a request; its consumer gets a final output with finish_reason "abort"."""
        self._post_op(Abort(request_id))

    def _post_op(self, op: Op) -> None:
        with self._cond:
            self._inbox.append(op)
            if isinstance(op, GenerateRequest):
                self._num_pending_adds += 1
            self._cond.notify()

    # ---- the engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while (ops := self._wait_for_work()) is not None:
                step = self._apply(ops)
                if self.core.has_unfinished():
                    step.outputs.extend(self.core.step())
                news = step.outputs or step.refusals
                if news and not self._front.deliver(self._front.dispatch, step):
                    return
        except Exception as exc:
            logger.exception("engine step failed; failing every in-flight request")
            self._front.fail(f"engine failure: {type(exc).__name__}: {exc}")

    def _wait_for_work(self) -> list[Op] | None:
        """Sleep until there is something to do; the inbox, or None to stop."""
        with self._cond:
            while not (self._stopping or self._inbox or self.core.has_unfinished()):
                self._cond.wait()
            if self._stopping:
                return None
            ops, self._inbox = self._inbox, []
            return ops

    def _apply(self, ops: list[Op]) -> StepOutputs:
        """Hand the inbox to the core, in order. Each add leaves the pending count in
        the same critical section that puts it in the core's queue, so num_waiting
        never reads low."""
        step = StepOutputs([])
        for op in ops:
            if isinstance(op, Abort):
                apply_op(self.core, op, step)
                continue
            with self._cond:
                apply_op(self.core, op, step)
                self._num_pending_adds -= 1
        return step

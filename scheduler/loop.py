"""The serving loop: the engine core in its own thread, an async interface for the server.

    loop = EngineLoop(core)
    loop.start()                       # from the event loop (e.g. the app's lifespan)
    async for out in loop.generate(GenerateRequest("r1", [1, 2, 3], SamplingParams())):
        ...                            # one RequestOutput per step with news; the last
                                       # has finished=True
    loop.shutdown(timeout=10)

Threads: the event loop adds and aborts requests through an inbox under a lock; the
engine thread drains it at the start of each step, steps the core, and hands the
step's outputs back in ONE `call_soon_threadsafe`, which spreads them over per-request
asyncio queues. With nothing to do the engine thread sleeps on a condition.
If a step raises, every in-flight request gets a final error output and the loop is
dead (`alive` is False); nothing hangs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import QueueFullError

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (never started, shut down, or a step failed)."""


@dataclass(slots=True)
class _Abort:
    request_id: str  # the request to abort


@dataclass(slots=True)
class _Stream:
    queue: asyncio.Queue[RequestOutput]  # outputs for one consumer
    num_prompt_tokens: int  # for the error output if the engine dies


def error_output(request_id: str, error: str, num_prompt_tokens: int = 0) -> RequestOutput:
    """A final output for a request that failed."""
    return RequestOutput(
        request_id=request_id,
        new_token_ids=[],
        new_logprobs=None,
        prompt_logprobs=None,
        finished=True,
        finish_reason="abort",
        stop_token_id=None,
        num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=0,
        num_cached_tokens=0,
        error=error,
    )


class EngineLoop:
    """Runs an EngineCore in a dedicated thread; async generate() per request."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._cond = threading.Condition()
        self._inbox: list[GenerateRequest | _Abort] = []  # guarded by _cond
        self._num_inbox_adds = 0  # GenerateRequests in _inbox; guarded by _cond
        self._stopping = False  # guarded by _cond
        self._error: str | None = None  # why the loop is dead, once it is
        self._thread: threading.Thread | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}  # event-loop thread only
        self._executor_shut_down = False

    # ---- lifecycle -----------------------------------------------------------------

    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs are delivered on `event_loop` (default: the
        running one, so call this from async code or pass the loop)."""
        if self._thread is not None:
            raise RuntimeError("the engine loop was started already")
        if event_loop is None:
            try:
                event_loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "EngineLoop.start() needs an asyncio event loop: call it from async "
                    "code or pass event_loop="
                ) from None
        self._event_loop = event_loop
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
        if self._error is None:
            self._error = "the engine loop was shut down"
            self._post(self._fail_all, self._error)
        if stopped and not self._executor_shut_down:
            self._executor_shut_down = True
            self.core.shutdown()
        return stopped

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def num_running(self) -> int:
        return self.core.num_running

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self.core.num_waiting + self._num_inbox_adds

    def can_admit(self) -> bool:
        """Whether one more request fits in the waiting queue (else: 429)."""
        return self.num_waiting < self.core.config.max_queued_requests

    # ---- the async interface (event-loop thread) ------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit req and yield its outputs until the finished one.

        Raises ValueError (the request can never run, or its id is live already),
        QueueFullError, or EngineDeadError, before anything is yielded. If the
        consumer stops early or is cancelled, the request is aborted in the engine."""
        self._check_submit(req)
        stream = _Stream(asyncio.Queue(), len(req.prompt_token_ids))
        self._streams[req.request_id] = stream
        finished = False
        try:
            if self._error is not None:  # died before we registered: no one will fail us
                raise EngineDeadError(self._error)
            self._post_op(req)
            while not finished:
                out = await stream.queue.get()
                finished = out.finished
                yield out
        finally:
            if self._streams.get(req.request_id) is stream:
                del self._streams[req.request_id]
            if not finished:
                self._post_op(_Abort(req.request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request; its consumer gets a final output with finish_reason "abort"."""
        self._post_op(_Abort(request_id))

    def _check_submit(self, req: GenerateRequest) -> None:
        if self._error is not None or not self.alive:
            raise EngineDeadError(self._error or "the engine loop is not running")
        if self._event_loop is not asyncio.get_running_loop():
            raise RuntimeError("generate() must run on the event loop the engine loop started on")
        if req.request_id in self._streams:
            raise ValueError(f"request {req.request_id} is already running")
        self.core.check_request(req)
        if not self.can_admit():
            raise QueueFullError(
                f"the waiting queue is full (max_queued_requests="
                f"{self.core.config.max_queued_requests})"
            )

    def _post_op(self, op: GenerateRequest | _Abort) -> None:
        with self._cond:
            self._inbox.append(op)
            if isinstance(op, GenerateRequest):
                self._num_inbox_adds += 1
            self._cond.notify()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Event-loop side of one step: spread its outputs over the request queues."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)

    def _fail_all(self, error: str) -> None:
        for request_id, stream in self._streams.items():
            stream.queue.put_nowait(error_output(request_id, error, stream.num_prompt_tokens))

    # ---- the engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            while (ops := self._wait_for_work()) is not None:
                outputs = self._apply(ops)
                if self.core.has_unfinished():
                    outputs.extend(self.core.step())
                if outputs and not self._post(self._dispatch, outputs):
                    return
        except Exception as exc:
            logger.exception("engine step failed; failing every in-flight request")
            self._error = f"engine failure: {type(exc).__name__}: {exc}"
            self._post(self._fail_all, self._error)

    def _wait_for_work(self) -> list[GenerateRequest | _Abort] | None:
        """Sleep until there is something to do; the inbox, or None to stop."""
        with self._cond:
            while not (self._stopping or self._inbox or self.core.has_unfinished()):
                self._cond.wait()
            if self._stopping:
                return None
            ops, self._inbox = self._inbox, []
            self._num_inbox_adds = 0
            return ops

    def _apply(self, ops: list[GenerateRequest | _Abort]) -> list[RequestOutput]:
        """Hand the inbox to the core, in order; refusals become error outputs."""
        outputs: list[RequestOutput] = []
        for op in ops:
            if isinstance(op, _Abort):
                out = self.core.abort_request(op.request_id)
                if out is not None:
                    outputs.append(out)
                continue
            try:
                self.core.add_request(op)
            except (ValueError, QueueFullError) as exc:
                outputs.append(error_output(op.request_id, str(exc), len(op.prompt_token_ids)))
        return outputs

    def _post(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """Run fn(arg) on the event loop; False if it is closed (nobody is listening)."""
        loop = self._event_loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            self._error = self._error or "the event loop closed"
            return False
        return True

"""What both serving loops share: the ops the event loop sends to the engine core, the
outputs of one step coming back, and the event-loop side that spreads those outputs
over one asyncio queue per request.

    event loop                               engine (a thread, or a child process)
    ----------                               ------------------------------------
    generate(req) -> submit(req) ----------> apply_ops(core, [req, Abort(..), ...])
                                             core.step()
    Frontend.dispatch(StepOutputs) <-------- ONE hand-over per step: outputs + refusals

A request the engine refuses when it arrives (its waiting queue filled up in the
meantime, or the request can never run) comes back as a `Refusal`, and `generate()`
raises the matching typed error (QueueFullError -> HTTP 429, ValueError -> 400) before
anything was yielded, exactly as if the loop itself had refused it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import QueueFullError


class EngineDeadError(RuntimeError):
    """The engine loop is not running (never started, shut down, or a step failed)."""


@dataclass(slots=True)
class Abort:
    """An op: abort a request (its consumer gets a final "abort" output)."""

    request_id: str


Op: TypeAlias = GenerateRequest | Abort  # what the event loop sends to the core, in order


@dataclass(slots=True)
class Refusal:
    """A request the engine core refused on arrival; nothing was yielded for it."""

    request_id: str
    queue_full: bool  # True: the waiting queue was full (QueueFullError, HTTP 429);
    # False: the request can never run or its id is live (ValueError, HTTP 400)
    message: str  # the core's error message

    def exception(self) -> Exception:
        return QueueFullError(self.message) if self.queue_full else ValueError(self.message)


@dataclass(slots=True)
class StepOutputs:
    """One step's news for the event loop, handed over in one call."""

    outputs: list[RequestOutput]  # at most one per request, in the core's order
    refusals: list[Refusal] = field(default_factory=list)  # requests refused on arrival


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


def apply_op(core: EngineCore, op: Op, step: StepOutputs) -> None:
    """Hand one op to the core (engine side); an abort's final output and a refusal
    go into `step`."""
    if isinstance(op, Abort):
        out = core.abort_request(op.request_id)
        if out is not None:
            step.outputs.append(out)
        return
    try:
        core.add_request(op)
    except QueueFullError as exc:
        step.refusals.append(Refusal(op.request_id, True, str(exc)))
    except ValueError as exc:
        step.refusals.append(Refusal(op.request_id, False, str(exc)))


@dataclass(slots=True)
class _Stream:
    queue: asyncio.Queue[RequestOutput | Refusal]  # news for one consumer
    num_prompt_tokens: int  # for the error output if the engine dies


class Frontend:
    """The event-loop side of a serving loop: per-request queues fed one step at a time.

    `submit` and `abort` send an op towards the engine (called on the event loop, must
    not block). `deliver` and `fail` may be called from any thread; everything else
    runs on the event loop the frontend was bound to.
    """

    def __init__(self, submit: Callable[[GenerateRequest], None], abort: Callable[[str], None]):
        self._submit = submit
        self._abort = abort
        self.event_loop: asyncio.AbstractEventLoop | None = None  # set by bind()
        self.error: str | None = None  # why the loop is dead, once it is
        self._streams: dict[str, _Stream] = {}  # event-loop thread only

    def bind(self, event_loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
        """Deliver on `event_loop` (default: the running one)."""
        if event_loop is None:
            try:
                event_loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "start() needs an asyncio event loop: call it from async code or pass "
                    "event_loop="
                ) from None
        self.event_loop = event_loop
        return event_loop

    async def generate(
        self,
        req: GenerateRequest,
        alive: Callable[[], bool],
        check: Callable[[GenerateRequest], None],
    ) -> AsyncIterator[RequestOutput]:
        """Submit req and yield its outputs until the finished one.

        Refusals raise before anything is yielded: EngineDeadError (not `alive()`), a
        live request id (ValueError), what `check` (the loop's own admission) raises,
        and the core's refusal on arrival. Leaving early aborts req in the engine."""
        if self.error is not None or not alive():
            raise EngineDeadError(self.error or "the engine loop is not running")
        if self.event_loop is not asyncio.get_running_loop():
            raise RuntimeError("generate() must run on the event loop the engine loop started on")
        if req.request_id in self._streams:
            raise ValueError(f"request {req.request_id} is already running")
        check(req)
        stream = _Stream(asyncio.Queue(), len(req.prompt_token_ids))
        self._streams[req.request_id] = stream
        finished = False
        try:
            if self.error is not None:  # died before we registered: no one will fail us
                raise EngineDeadError(self.error)
            self._submit(req)
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, Refusal):
                    finished = True  # never entered the core: nothing to abort
                    raise out.exception()
                finished = out.finished
                yield out
        finally:
            if self._streams.get(req.request_id) is stream:
                del self._streams[req.request_id]
            if not finished:
                self._abort(req.request_id)

    def deliver(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """Run fn(arg) on the event loop (any thread); False if the loop is closed."""
        loop = self.event_loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            self.error = self.error or "the event loop closed"
            return False
        return True

    def dispatch(self, step: StepOutputs) -> None:
        """Event-loop side of one step: spread its news over the request queues."""
        for out in step.outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.queue.put_nowait(out)
        for refusal in step.refusals:
            stream = self._streams.get(refusal.request_id)
            if stream is not None:
                stream.queue.put_nowait(refusal)

    def fail(self, error: str) -> None:
        """The loop is dead (any thread): every in-flight request gets a final error
        output, and generate() refuses from now on. Only the first error counts."""
        if self.error is None:
            self.error = error
            self.deliver(self._fail_all, error)

    def _fail_all(self, error: str) -> None:
        for request_id, stream in self._streams.items():
            stream.queue.put_nowait(error_output(request_id, error, stream.num_prompt_tokens))

"""The serving loop with the engine core in its own process (as vLLM's EngineCoreProc).

    loop = ProcessEngineLoop(functools.partial(build_core, engine_cfg, sched_cfg))
    loop.launch()                      # blocking: spawn, build the core there, handshake
    loop.start()                       # from the event loop; then as EngineLoop
    async for out in loop.generate(req): ...
    loop.shutdown(timeout=10)

Same interface as `EngineLoop` (`ServingLoop`), but the engine's Python work runs in
another interpreter, so it no longer competes with the HTTP event loop for one GIL.
The child is started with the "spawn" method and builds the core from a picklable
factory: this module never imports the engine's executors (or torch).

Threads of the parent: the event loop posts ops to an outbox; a sender thread pickles
them onto the ops pipe in batches (a full pipe never blocks the event loop); a reader
thread receives one `StepMessage` per step and hands it to the event loop in ONE
`call_soon_threadsafe`. If the child fails a step, dies or is killed, every in-flight
request gets a final error output and `alive` turns False; nothing hangs.

Admission: `num_waiting` is the child's waiting queue as of its last message plus the
requests posted since that it has not yet acknowledged, so `can_admit()` lets no more
through than the child will take. A race the parent cannot see (the child preempting
a request back into its queue) comes back as a refusal: generate() raises
QueueFullError, which the server answers with 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.util import Finalize

from tandem.engine.plan import KVCacheInfo
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore, EngineStats
from tandem.scheduler.engine_process import (
    Failed,
    Ready,
    StepMessage,
    Stop,
    run_engine_process,
)
from tandem.scheduler.loop import queue_full_error
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import Scheduler
from tandem.scheduler.stats import StepStats
from tandem.scheduler.streams import Abort, Frontend, Op

logger = logging.getLogger(__name__)
KILL_WAIT_S = 5.0  # how long to wait for the child to be reaped after SIGKILL


class EngineStartError(RuntimeError):
    """The engine process could not build the core (the message is the child's error,
    one line), or died while doing so."""


class ProcessEngineLoop:
    """Runs an EngineCore in a child process; async generate() per request."""

    def __init__(
        self,
        factory: Callable[[], EngineCore],
        stats_history: int = 256,
        log_setup: Callable[[], None] | None = None,
    ) -> None:
        """factory: builds the core in the child. log_setup: configures logging in the
        child (default: a text format at this process's root level). Both must pickle:
        module-level functions, or functools.partial of them with picklable arguments.
        stats_history: recent steps stats() keeps (the child sends each step's)."""
        self._factory = factory
        self._log_setup = log_setup
        self._proc: BaseProcess | None = None
        self._ops: Connection | None = None  # parent end of the ops pipe (write)
        self._out: Connection | None = None  # parent end of the outputs pipe (read)
        self._ready: Ready | None = None  # the handshake, once launched
        self._checker: Scheduler | None = None  # never schedules: check_request only
        self._front = Frontend(self._post_op, self.abort)
        self._cond = threading.Condition()  # guards _outbox and _stopping
        self._outbox: list[Op] = []
        self._stopping = False
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._started = False
        # admission counts: event-loop thread only (updated by each step's hand-over)
        self._num_posted_adds = 0  # GenerateRequests posted
        self._num_acked_adds = 0  # of those, taken in by the child
        self._num_waiting = 0  # the child's waiting queue, as of its last message
        self._num_running = 0  # likewise
        # stats(): replaced whole by the reader thread, read from any thread
        self._stats_lock = threading.Lock()
        self._stats: EngineStats | None = None
        self._recent: deque[StepStats] = deque(maxlen=stats_history)

    # ---- lifecycle -----------------------------------------------------------------

    def launch(self, timeout: float | None = None) -> None:
        """Spawn the child and wait until it has built the core (the model load: slow,
        call it off the event loop). Raises EngineStartError with the child's error."""
        if self._proc is not None:
            raise RuntimeError("the engine process was launched already")
        ctx = multiprocessing.get_context("spawn")
        ops_r, ops_w = ctx.Pipe(duplex=False)
        out_r, out_w = ctx.Pipe(duplex=False)
        log_setup = self._log_setup or logging.getLogger().getEffectiveLevel()
        args = (self._factory, ops_r, out_w, os.getpid(), log_setup)
        proc = ctx.Process(target=run_engine_process, args=args, name="tandem-engine")
        proc.start()
        ops_r.close()  # the child's ends: once only the child holds them, its exit is
        out_w.close()  # an EOF here
        self._proc, self._ops, self._out = proc, ops_w, out_r
        Finalize(self, _kill, args=(proc,), exitpriority=10)  # on GC or interpreter exit
        try:
            ready = self._handshake(timeout)
        except BaseException:
            _kill(proc, grace_s=KILL_WAIT_S)  # a failed child exits by itself
            ops_w.close()
            out_r.close()
            raise
        self._ready = ready
        self._checker = Scheduler(ready.config, ready.kv)
        self._stats = ready.stats
        self._sender = threading.Thread(target=self._send_loop, name="tandem-engine-send")
        self._reader = threading.Thread(target=self._read_loop, name="tandem-engine-read")
        self._sender.daemon = self._reader.daemon = True
        self._sender.start()
        self._reader.start()

    def _handshake(self, timeout: float | None) -> Ready:
        assert self._out is not None and self._proc is not None
        if not self._out.poll(timeout):
            raise EngineStartError(f"the engine process did not start within {timeout} s")
        try:
            msg = self._out.recv()
        except EOFError:
            self._proc.join(KILL_WAIT_S)
            raise EngineStartError(
                f"the engine process exited while loading ({_exit_reason(self._proc)})"
            ) from None
        if isinstance(msg, Failed):
            logger.debug("engine process failed to start:\n%s", msg.traceback)
            raise EngineStartError(msg.error)
        assert isinstance(msg, Ready), f"unexpected handshake {msg!r}"
        return msg

    def start(self, event_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Deliver outputs on `event_loop` (default: the running one) from now on."""
        if self._ready is None:
            raise RuntimeError("launch() the engine process before start()")
        if self._started:
            raise RuntimeError("the engine loop was started already")
        self._front.bind(event_loop)
        self._started = True

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the child (Stop, then SIGKILL after `timeout` s); fail requests still in
        flight. Returns whether the child stopped by itself in time."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        proc = self._proc
        if proc is None:
            return True
        self._front.fail("the engine loop was shut down")
        proc.join(timeout)
        stopped = proc.exitcode is not None
        if not stopped:
            logger.warning("the engine process did not stop in %.1f s: killing it", timeout)
            _kill(proc)
        for t in (self._sender, self._reader):
            if t is not None:
                t.join(KILL_WAIT_S)
        if self._ops is not None and not (self._sender and self._sender.is_alive()):
            self._ops.close()
        return stopped

    # ---- state ---------------------------------------------------------------------

    @property
    def kv(self) -> KVCacheInfo:
        return self._handshake_info().kv

    @property
    def config(self) -> SchedulerConfig:
        return self._handshake_info().config

    @property
    def pid(self) -> int | None:
        """The engine process's pid (None before launch)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        reader = self._reader
        dead = self._front.error is not None
        return self._started and reader is not None and reader.is_alive() and not dead

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return self._num_waiting + self._num_posted_adds - self._num_acked_adds

    def can_admit(self) -> bool:
        """Whether one more request fits in the waiting queue (else: 429)."""
        return self.num_waiting < self.config.max_queued_requests

    def check_request(self, req: GenerateRequest) -> None:
        """Raise ValueError if req can never run (thread-safe)."""
        if self._checker is None:
            raise RuntimeError("the engine process is not launched")
        self._checker.check_request(req)

    def stats(self) -> EngineStats:
        """The child's stats as of its last message (same type as EngineCore.stats())."""
        with self._stats_lock:
            stats = self._stats
            if stats is None:
                raise RuntimeError("the engine process is not launched")
            steps = stats.steps
            recent = list(self._recent)
        totals = dataclasses.replace(steps, recent=recent)
        return EngineStats(stats.scheduler, totals)

    def _handshake_info(self) -> Ready:
        if self._ready is None:
            raise RuntimeError("the engine process is not launched")
        return self._ready

    # ---- the async interface (event-loop thread) ------------------------------------

    def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit req and yield its outputs until the finished one.

        Raises ValueError (the request can never run, or its id is live already),
        QueueFullError, or EngineDeadError, before anything is yielded. If the
        consumer stops early or is cancelled, the request is aborted in the engine."""
        return self._front.generate(req, lambda: self.alive, self._check_submit)

    def abort(self, request_id: str) -> None:
        """Abort a request; its consumer gets a final output with finish_reason "abort"."""
        self._post_op(Abort(request_id))

    def _check_submit(self, req: GenerateRequest) -> None:
        self.check_request(req)
        if not self.can_admit():
            raise queue_full_error(self.config)

    def _post_op(self, op: Op) -> None:
        if isinstance(op, GenerateRequest):
            self._num_posted_adds += 1
        with self._cond:
            self._outbox.append(op)
            self._cond.notify()

    def _on_step(self, msg: StepMessage) -> None:
        """Event-loop side of one step: admission counts, then the outputs."""
        self._num_acked_adds += msg.num_adds
        self._num_waiting = msg.scheduler.num_waiting
        self._num_running = msg.scheduler.num_running
        self._front.dispatch(msg.step)

    # ---- the sender and reader threads ------------------------------------------------

    def _send_loop(self) -> None:
        """Pickle the outbox onto the ops pipe, one batch per wake-up; Stop last."""
        assert self._ops is not None
        while True:
            with self._cond:
                while not (self._outbox or self._stopping):
                    self._cond.wait()
                batch, self._outbox = self._outbox, []
                stopping = self._stopping
            try:
                if batch:
                    self._ops.send(batch)
                if stopping:
                    self._ops.send(Stop())
            except OSError:  # the child is gone; the reader reports it
                return
            if stopping:
                return

    def _read_loop(self) -> None:
        """Receive the child's messages until its pipe closes; hand each step over."""
        assert self._out is not None and self._proc is not None
        while True:
            try:
                msg = self._out.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, StepMessage):
                self._record_stats(msg)
                self._front.deliver(self._on_step, msg)
            elif isinstance(msg, Failed):
                logger.error("the engine process failed:\n%s", msg.traceback)
                self._front.fail(f"engine failure: {msg.error}")
        self._out.close()
        if not self._stopping:
            self._proc.join(KILL_WAIT_S)
            reason = _exit_reason(self._proc)
            logger.error("the engine process exited unexpectedly (%s)", reason)
            self._front.fail(f"engine failure: the engine process exited ({reason})")

    def _record_stats(self, msg: StepMessage) -> None:
        with self._stats_lock:
            self._recent.extend(msg.steps.recent)
            self._stats = EngineStats(msg.scheduler, msg.steps)


def _kill(proc: BaseProcess, grace_s: float = 0.0) -> None:
    """SIGKILL the child if it still runs after `grace_s`, and reap it (no zombie, no
    orphan). The child ignores SIGTERM (see engine_process), hence SIGKILL. Processes
    the child started (a local Ray cluster: GCS, raylet, agents, rank actors) would
    outlive a killed child, so they get SIGKILL too."""
    if grace_s > 0:
        proc.join(grace_s)
    if proc.exitcode is None and proc.pid is not None:
        descendants = _descendants(proc.pid)
        proc.kill()
        proc.join(KILL_WAIT_S)
        for pid in descendants:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (Linux; empty where there is no /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        if parent != pid:
            found.append(parent)
    return found


def _exit_reason(proc: BaseProcess) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

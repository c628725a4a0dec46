"""The child side of `ProcessEngineLoop`: the engine core's step loop in its own process.

    parent (server)                           child (spawned: a fresh interpreter)
    ops pipe  [GenerateRequest | Abort, ...] ->  core = factory()   (loads the model)
              Stop                           ->
    out pipe                                 <-  Ready(kv, config, stats) | Failed(error)
                                             <-  StepMessage: ONE per step
                                             <-  Failed(error): a step raised; then it exits

Each round the child drains the ops pipe (blocking only when the core has nothing to
do), hands the ops to the core, steps it, and sends one `StepMessage` with every
output of the step, the refusals, how many requests it took in, and a stats snapshot.

The child never outlives the server: it exits on Stop, when the parent's end of a pipe
closes, or when its parent pid changes (polled while idle). It ignores SIGINT and
SIGTERM: a Ctrl-C or a SIGTERM to the whole process group belongs to the parent, which
drains first and then stops the child (SIGKILL if it does not stop in time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from tandem.engine.plan import KVCacheInfo
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.core import EngineCore, EngineStats
from tandem.scheduler.request import GenerateRequest
from tandem.scheduler.scheduler import SchedulerStats
from tandem.scheduler.stats import StepTotals
from tandem.scheduler.streams import Op, StepOutputs, apply_op

logger = logging.getLogger(__name__)
PARENT_POLL_S = 1.0  # while idle, how often the child checks that its parent lives
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [engine pid %(process)d]: %(message)s"


@dataclass(slots=True)
class Stop:
    """Parent -> child: stop stepping, shut the executor down, exit."""


@dataclass(slots=True)
class Ready:
    """Child -> parent, once: the core is built."""

    kv: KVCacheInfo  # the engine's KV cache (max_model_len, block size, ...)
    config: SchedulerConfig  # the core's scheduler config
    stats: EngineStats  # before any step


@dataclass(slots=True)
class Failed:
    """Child -> parent: building the core or a step raised; the child then exits."""

    error: str  # one line: "ExceptionType: message"
    traceback: str  # the child's full traceback, for the parent's log


@dataclass(slots=True)
class StepMessage:
    """Child -> parent: one round of the loop (the ops it took, then one step)."""

    step: StepOutputs  # every output of the step, and the requests refused on arrival
    num_adds: int  # GenerateRequests taken from the ops pipe this round (added or refused)
    scheduler: SchedulerStats  # queues and KV cache after the step
    steps: StepTotals  # step totals after the step; `recent` holds only the steps
    # recorded since the previous message (the parent keeps the history)


def run_engine_process(
    factory: Callable[[], EngineCore],
    ops: Connection,
    out: Connection,
    parent_pid: int,
    log_setup: Callable[[], None] | int,
) -> None:
    """The child's main: configure logging (`log_setup()`, or a level for a plain text
    format), build the core with `factory`, shake hands, serve. Both callables must
    pickle: module-level functions, or functools.partial of them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if isinstance(log_setup, int):
            logging.basicConfig(level=log_setup, format=LOG_FORMAT)
        else:
            log_setup()
        core = factory()
    except BaseException as exc:  # reported to the parent, which raises it at launch
        _send_quietly(out, _failed(exc))
        sys.exit(1)
    try:
        out.send(Ready(core.kv, core.config, core.stats()))
        serve(core, ops, out, parent_pid)
    except (EOFError, BrokenPipeError):
        return  # the parent is gone or closed the pipes: nobody to tell
    except Exception as exc:  # the parent logs the traceback and fails every request
        _send_quietly(out, _failed(exc))
        sys.exit(1)
    finally:
        _shutdown_quietly(core)


def serve(core: EngineCore, ops_in: Connection, out: Connection, parent_pid: int) -> None:
    """The loop: drain ops, step, send one StepMessage; until Stop or the parent goes."""
    num_sent_steps = core.stats().steps.num_steps
    while (ops := receive_ops(ops_in, not core.has_unfinished(), parent_pid)) is not None:
        step = StepOutputs([])
        for op in ops:
            apply_op(core, op, step)
        if core.has_unfinished():
            step.outputs.extend(core.step())
        stats = core.stats()
        totals = stats.steps
        num_new = min(totals.num_steps - num_sent_steps, len(totals.recent))
        totals.recent = totals.recent[len(totals.recent) - num_new :]
        num_sent_steps = totals.num_steps
        num_adds = sum(isinstance(op, GenerateRequest) for op in ops)
        out.send(StepMessage(step, num_adds, stats.scheduler, totals))


def receive_ops(conn: Connection, block: bool, parent_pid: int) -> list[Op] | None:
    """Every op that has arrived, in order; with `block`, wait for at least one.
    None means stop: Stop was sent, or the parent died. EOFError: the pipe closed."""
    if block:
        while not conn.poll(PARENT_POLL_S):
            if os.getppid() != parent_pid:
                return None
    ops: list[Op] = []
    while conn.poll():
        batch = conn.recv()
        if isinstance(batch, Stop):
            return None
        ops.extend(batch)
    return ops


def _failed(exc: BaseException) -> Failed:
    lines = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return Failed(message, "".join(traceback.format_exception(exc)))


def _shutdown_quietly(core: EngineCore) -> None:
    try:
        core.shutdown()
    except Exception:  # a broken executor must not hide why the loop ended
        logger.exception("executor shutdown failed")


def _send_quietly(out: Connection, msg: Failed) -> None:
    with contextlib.suppress(OSError):  # the parent is gone
        out.send(msg)

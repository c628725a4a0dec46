"""ProcessEngineLoop: the core in a spawned child process behind the EngineLoop interface,
with the fake executor (picklable factories in process_fakes)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from process_fakes import broken_factory, fake_core, refusing_core
from scheduler_fakes import greedy, reference_tokens

from tandem.scheduler.core import EngineStats
from tandem.scheduler.loop import EngineDeadError
from tandem.scheduler.process_loop import EngineStartError, ProcessEngineLoop
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import QueueFullError

HERE = Path(__file__).resolve().parent


def launched(factory=fake_core, **kwargs) -> ProcessEngineLoop:
    loop = ProcessEngineLoop(functools.partial(factory, **kwargs) if kwargs else factory)
    loop.launch(timeout=60)
    return loop


async def collect(loop: ProcessEngineLoop, req: GenerateRequest) -> list[RequestOutput]:
    return [out async for out in loop.generate(req)]


async def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def assert_gone(pid: int) -> None:
    """The child exited and was reaped (no zombie left behind)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def prompts(n: int) -> list[list[int]]:
    return [[(i * 7 + j) % 40 + 1 for j in range(3 + i)] for i in range(n)]


def test_concurrent_generates_one_message_per_step_and_stats():
    async def main():
        loop = launched(max_num_batched_tokens=16)
        assert loop.kv.max_model_len == 512 and loop.config.max_num_batched_tokens == 16
        messages: list[list[str]] = []
        on_step = loop._on_step

        def counting(msg):
            messages.append([o.request_id for o in msg.step.outputs])
            on_step(msg)

        loop._on_step = counting
        loop.start()
        os.kill(loop.pid, signal.SIGTERM)  # a group SIGTERM is the parent's to handle
        os.kill(loop.pid, signal.SIGINT)
        reqs = [
            GenerateRequest(f"r{i}", p, greedy(max_tokens=10)) for i, p in enumerate(prompts(8))
        ]
        results = await asyncio.gather(*(collect(loop, r) for r in reqs))
        for req, outs in zip(reqs, results, strict=True):
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            got = [t for o in outs for t in o.new_token_ids]
            assert got == reference_tokens(req.prompt_token_ids, 10)
        assert all(len(ids) == len(set(ids)) for ids in messages)  # one output per request
        assert max(len(ids) for ids in messages) > 1  # a step's outputs travel together
        stats = loop.stats()
        assert isinstance(stats, EngineStats)
        assert 0 < stats.steps.num_steps == len(stats.steps.recent) <= len(messages)
        assert stats.steps.num_decode_tokens > 0 and stats.scheduler.num_running == 0
        assert loop.num_running == 0 and loop.num_waiting == 0 and loop.alive
        pid = loop.pid
        assert loop.shutdown(timeout=10) and not loop.alive
        assert_gone(pid)

    asyncio.run(main())


def test_cancel_and_abort_reach_the_child_and_free_its_blocks():
    async def main():
        loop = launched(step_delay_s=0.002)
        loop.start()
        got: list[RequestOutput] = []

        async def consume():
            async for out in loop.generate(GenerateRequest("r", [1, 2, 3], greedy(10_000))):
                got.append(out)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(got) >= 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: loop.num_running == 0)
        kv = loop.stats().scheduler.kv
        assert kv.num_free_blocks == kv.num_blocks and not got[-1].finished
        outs: list[RequestOutput] = []
        async for out in loop.generate(GenerateRequest("s", [1, 2, 3], greedy(10_000))):
            outs.append(out)
            if len(outs) == 2:
                loop.abort("s")
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert outs[-1].error is None
        loop.shutdown(timeout=10)

    asyncio.run(main())


def test_a_failed_step_fails_every_request_and_the_loop():
    async def main():
        loop = launched(fail_at_step=3, max_num_batched_tokens=4)
        loop.start()
        reqs = [
            GenerateRequest(f"r{i}", p, greedy(max_tokens=50)) for i, p in enumerate(prompts(4))
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(loop, r) for r in reqs)), timeout=20
        )
        for outs in results:
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert "injected executor failure" in outs[-1].error
        await wait_until(lambda: not loop.alive)
        with pytest.raises(EngineDeadError, match="injected"):
            await collect(loop, GenerateRequest("late", [1], greedy()))
        pid = loop.pid
        assert loop.shutdown(timeout=5)  # the child is gone already
        assert_gone(pid)

    asyncio.run(main())


def test_a_killed_child_fails_every_request_and_nothing_hangs():
    async def main():
        loop = launched(step_delay_s=0.002)
        loop.start()
        got: list[RequestOutput] = []

        async def consume(i: int):
            async for out in loop.generate(GenerateRequest(f"r{i}", [1, 2, i], greedy(10_000))):
                got.append(out)

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        await wait_until(lambda: len(got) >= 6)
        os.kill(loop.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        errors = [o.error for o in got if o.finished]
        assert len(errors) == 3 and all("killed by signal 9" in e for e in errors)
        assert not loop.alive
        with pytest.raises(EngineDeadError, match="killed"):
            await collect(loop, GenerateRequest("late", [1], greedy()))
        assert loop.shutdown(timeout=5)

    asyncio.run(main())


def test_shutdown_fails_in_flight_requests_and_stops_the_child():
    async def main():
        loop = launched(step_delay_s=0.002)
        loop.start()
        got: list[RequestOutput] = []

        async def consume():
            async for out in loop.generate(GenerateRequest("r", [1, 2], greedy(10_000))):
                got.append(out)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(got) >= 2)
        pid = loop.pid
        assert loop.shutdown(timeout=10) and loop.shutdown(timeout=10)
        await asyncio.wait_for(task, timeout=5)
        assert got[-1].finished and got[-1].error == "the engine loop was shut down"
        assert not loop.alive
        assert_gone(pid)

    asyncio.run(main())


def test_admission_counts_requests_in_transit_exactly():
    async def main():
        loop = launched(step_delay_s=0.01, max_num_seqs=1, max_queued_requests=2)
        loop.start()
        first: list[RequestOutput] = []

        async def consume(req: GenerateRequest, into: list[RequestOutput]):
            async for out in loop.generate(req):
                into.append(out)

        running = asyncio.create_task(consume(GenerateRequest("r0", [1], greedy(10_000)), first))
        await wait_until(lambda: len(first) >= 1 and loop.num_running == 1)
        waiting = [
            asyncio.create_task(consume(GenerateRequest(f"r{i}", [i], greedy(10_000)), []))
            for i in (1, 2)
        ]
        await asyncio.sleep(0)  # both submitted; the child has not answered yet
        assert loop.num_waiting == 2 and not loop.can_admit()
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            await collect(loop, GenerateRequest("r3", [3], greedy()))
        await asyncio.sleep(0.1)  # the child has acknowledged both: still exactly 2
        assert loop.num_waiting == 2 and loop.stats().scheduler.num_waiting == 2
        for t in [running, *waiting]:
            t.cancel()
        await asyncio.gather(running, *waiting, return_exceptions=True)
        await wait_until(lambda: loop.num_waiting == 0 and loop.num_running == 0)
        loop.shutdown(timeout=10)

    asyncio.run(main())


def test_refusals_in_the_child_raise_typed_errors():
    async def main():
        loop = launched(refusing_core)
        loop.start()
        with pytest.raises(QueueFullError, match="waiting already"):
            await collect(loop, GenerateRequest("full-1", [1, 2], greedy()))
        with pytest.raises(ValueError, match="cannot run"):
            await collect(loop, GenerateRequest("bad-1", [1, 2], greedy()))
        with pytest.raises(ValueError, match="at most 511"):  # checked here, not sent
            await collect(loop, GenerateRequest("long", [1] * 600, greedy()))
        outs = await collect(loop, GenerateRequest("ok", [1, 2], greedy(max_tokens=3)))
        assert outs[-1].finished and loop.num_waiting == 0 and loop.alive
        loop.shutdown(timeout=10)

    asyncio.run(main())


def test_a_factory_error_is_one_line_at_launch_and_leaves_no_child():
    loop = ProcessEngineLoop(broken_factory)
    with pytest.raises(EngineStartError) as info:
        loop.launch(timeout=60)
    assert str(info.value) == "ValueError: model directory '/nowhere' does not exist"
    assert_gone(loop.pid)
    assert not loop.alive and loop.shutdown(timeout=1)


def test_start_needs_launch_and_a_dead_loop_refuses():
    async def main():
        loop = ProcessEngineLoop(fake_core)
        with pytest.raises(RuntimeError, match="launch"):
            loop.start()
        with pytest.raises(EngineDeadError, match="not running"):
            await collect(loop, GenerateRequest("r", [1], greedy()))

    asyncio.run(main())


def test_the_child_exits_when_its_parent_dies():
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from process_fakes import fake_core
        from tandem.scheduler.process_loop import ProcessEngineLoop
        if __name__ == "__main__":
            loop = ProcessEngineLoop(fake_core)
            loop.launch(timeout=60)
            print(loop.pid, flush=True)
            sys.stdin.readline()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child_pid = int(parent.stdout.readline())
        os.kill(child_pid, 0)  # running
        parent.kill()  # no shutdown, no atexit: the child must notice on its own
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _running(child_pid):
            assert time.monotonic() < deadline, "the engine child outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _running(pid: int) -> bool:
    """Whether pid runs (an orphan is reaped by init; a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False

"""EngineLoop: the core in a thread behind an async interface, with the fake executor."""

from __future__ import annotations

import asyncio
import time

import pytest
from scheduler_fakes import FakeExecutor, greedy, make_core, reference_tokens

from tandem.scheduler.loop import EngineDeadError, EngineLoop
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.scheduler.scheduler import QueueFullError


async def collect(loop: EngineLoop, req: GenerateRequest) -> list[RequestOutput]:
    return [out async for out in loop.generate(req)]


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def prompts(n: int) -> list[list[int]]:
    return [[(i * 7 + j) % 40 + 1 for j in range(3 + i)] for i in range(n)]


def test_concurrent_generates_complete_and_outputs_come_once_per_step():
    async def main():
        core, _ = make_core(max_num_batched_tokens=16)
        loop = EngineLoop(core)
        dispatched: list[list[str]] = []
        nonempty_steps = 0
        step, dispatch = core.step, loop._front.dispatch

        def counting_step():
            nonlocal nonempty_steps
            outs = step()
            nonempty_steps += bool(outs)
            return outs

        def counting_dispatch(step_outputs):
            dispatched.append([o.request_id for o in step_outputs.outputs])
            dispatch(step_outputs)

        core.step, loop._front.dispatch = counting_step, counting_dispatch
        loop.start()
        reqs = [
            GenerateRequest(f"r{i}", p, greedy(max_tokens=10)) for i, p in enumerate(prompts(8))
        ]
        results = await asyncio.gather(*(collect(loop, r) for r in reqs))
        for req, outs in zip(reqs, results, strict=True):
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            got = [t for o in outs for t in o.new_token_ids]
            assert got == reference_tokens(req.prompt_token_ids, 10)
        assert len(dispatched) == nonempty_steps  # one hand-over per step
        assert all(len(ids) == len(set(ids)) for ids in dispatched)
        assert max(len(ids) for ids in dispatched) > 1  # batched, not one per request
        assert loop.shutdown(timeout=5) and not loop.alive
        assert core.executor.shut_down

    asyncio.run(main())


def test_cancelled_consumer_aborts_the_request_and_frees_its_blocks():
    async def main():
        ex = FakeExecutor(step_delay_s=0.002)
        core, _ = make_core(ex)
        loop = EngineLoop(core)
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
        await wait_until(lambda: not core.has_unfinished())
        assert core.stats().scheduler.kv.num_free_blocks == ex.info.num_blocks
        assert len(got) < 10_000 and not got[-1].finished
        # the worker hears about it with the next step
        outs = await collect(loop, GenerateRequest("s", [4, 5], greedy(max_tokens=2)))
        assert outs[-1].finished and 0 in ex.freed_seq_ids
        loop.shutdown(timeout=5)

    asyncio.run(main())


def test_breaking_out_of_the_iteration_aborts_too():
    async def main():
        core, _ = make_core(FakeExecutor(step_delay_s=0.002))
        loop = EngineLoop(core)
        loop.start()
        gen = loop.generate(GenerateRequest("r", [1, 2, 3], greedy(10_000)))
        async for _ in gen:
            break
        await gen.aclose()
        await wait_until(lambda: not core.has_unfinished())
        loop.shutdown(timeout=5)

    asyncio.run(main())


def test_abort_gives_the_consumer_a_final_abort_output():
    async def main():
        core, _ = make_core(FakeExecutor(step_delay_s=0.002))
        loop = EngineLoop(core)
        loop.start()
        outs: list[RequestOutput] = []
        async for out in loop.generate(GenerateRequest("r", [1, 2, 3], greedy(10_000))):
            outs.append(out)
            if len(outs) == 2:
                loop.abort("r")
        assert outs[-1].finished and outs[-1].finish_reason == "abort"
        assert outs[-1].error is None
        loop.shutdown(timeout=5)

    asyncio.run(main())


def test_executor_failure_fails_in_flight_requests_and_kills_the_loop():
    async def main():
        core, _ = make_core(FakeExecutor(fail_at_step=3), max_num_batched_tokens=4)
        loop = EngineLoop(core)
        loop.start()
        reqs = [
            GenerateRequest(f"r{i}", p, greedy(max_tokens=50)) for i, p in enumerate(prompts(4))
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(loop, r) for r in reqs)), timeout=10
        )
        for outs in results:
            assert outs[-1].finished and outs[-1].finish_reason == "abort"
            assert "injected executor failure" in outs[-1].error
        await wait_until(lambda: not loop.alive)
        with pytest.raises(EngineDeadError, match="injected"):
            await collect(loop, GenerateRequest("late", [1], greedy()))
        assert loop.shutdown(timeout=1)  # the thread is gone already

    asyncio.run(main())


def test_refusals_before_anything_is_yielded():
    async def main():
        core, _ = make_core(FakeExecutor(max_model_len=8))
        loop = EngineLoop(core)
        with pytest.raises(EngineDeadError, match="not running"):
            await collect(loop, GenerateRequest("r", [1], greedy()))
        loop.start()
        with pytest.raises(ValueError, match="at most 7"):
            await collect(loop, GenerateRequest("r", list(range(1, 10)), greedy()))
        assert loop.can_admit() and loop.num_waiting == 0 and loop.alive
        loop.shutdown(timeout=5)

    asyncio.run(main())


def test_start_outside_an_event_loop_needs_one():
    core, _ = make_core()
    with pytest.raises(RuntimeError, match="needs an asyncio event loop"):
        EngineLoop(core).start()


def test_shutdown_fails_in_flight_requests_once_and_stops_the_executor():
    async def main():
        ex = FakeExecutor(step_delay_s=0.002)
        core, _ = make_core(ex)
        loop = EngineLoop(core)
        loop.start()
        got: list[RequestOutput] = []

        async def consume():
            async for out in loop.generate(GenerateRequest("r", [1, 2], greedy(10_000))):
                got.append(out)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(got) >= 2)
        assert loop.shutdown(timeout=5) and loop.shutdown(timeout=5)
        await asyncio.wait_for(task, timeout=5)
        assert got[-1].finished and got[-1].error == "the engine loop was shut down"
        assert ex.shut_down and not loop.alive

    asyncio.run(main())


def test_num_waiting_counts_requests_being_handed_to_the_core():
    """The engine thread takes the inbox, then adds each request to the core: while it
    does, the requests must still count as waiting, or one too many gets admitted."""

    async def main():
        core, _ = make_core(FakeExecutor(step_delay_s=0.005), max_num_seqs=1, max_queued_requests=2)
        add = core.add_request

        def slow_add(req):
            time.sleep(0.05)  # widen the window between taking the inbox and adding
            add(req)

        core.add_request = slow_add
        loop = EngineLoop(core)
        loop.start()

        def submit(i: int) -> asyncio.Task:
            return asyncio.create_task(
                collect(loop, GenerateRequest(f"r{i}", [i + 1], greedy(200)))
            )

        tasks = [submit(0)]
        await wait_until(lambda: core.num_running == 1)
        tasks += [submit(1), submit(2)]
        await asyncio.sleep(0.01)  # the engine thread has taken them: adding, slowly
        seen = set()
        for _ in range(40):  # r1 and r2 in transit or queued: always exactly 2
            seen.add(loop.num_waiting)
            await asyncio.sleep(0.003)
        assert seen == {2} and not loop.can_admit()
        with pytest.raises(QueueFullError, match="max_queued_requests=2"):
            await collect(loop, GenerateRequest("r3", [4], greedy()))
        results = await asyncio.gather(*tasks)
        assert all(outs[-1].finish_reason == "length" for outs in results)
        loop.shutdown(timeout=5)

    asyncio.run(main())


def test_refusals_by_the_core_raise_typed_errors():
    async def main():
        core, _ = make_core()
        add = core.add_request

        def refusing_add(req):
            if req.request_id == "full":  # the queue filled up behind the loop's back
                raise QueueFullError("2 requests are waiting already")
            add(req)

        core.add_request = refusing_add
        loop = EngineLoop(core)
        loop.start()
        with pytest.raises(QueueFullError, match="waiting already"):
            await collect(loop, GenerateRequest("full", [1, 2], greedy()))
        outs = await collect(loop, GenerateRequest("ok", [1, 2], greedy(max_tokens=3)))
        assert outs[-1].finished and loop.num_waiting == 0
        stats = loop.stats()
        assert stats.steps.num_steps > 0 and loop.kv is core.kv and loop.config is core.config
        loop.shutdown(timeout=5)

    asyncio.run(main())

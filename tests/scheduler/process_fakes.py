"""Picklable core factories for ProcessEngineLoop tests: module-level functions (a
spawned child imports this module by name), built on the checking FakeExecutor."""

from __future__ import annotations

from scheduler_fakes import FakeExecutor, make_core

from tandem.scheduler.core import EngineCore
from tandem.scheduler.request import GenerateRequest
from tandem.scheduler.scheduler import QueueFullError


def fake_core(
    step_delay_s: float = 0.0,
    fail_at_step: int | None = None,
    max_model_len: int = 512,
    **config: object,
) -> EngineCore:
    """A core over the FakeExecutor; `config`: SchedulerConfig fields."""
    ex = FakeExecutor(
        max_model_len=max_model_len, step_delay_s=step_delay_s, fail_at_step=fail_at_step
    )
    return make_core(ex, **config)[0]


def broken_factory() -> EngineCore:
    raise ValueError("model directory '/nowhere' does not exist\nsecond line not shown")


def refusing_core() -> EngineCore:
    """A core that refuses ids starting with "full" as if its queue had filled up behind
    the parent's back (a preemption), and "bad" as a request it cannot run."""
    core = fake_core()
    add = core.add_request

    def add_request(req: GenerateRequest) -> None:
        if req.request_id.startswith("full"):
            raise QueueFullError("2 requests are waiting already (max_queued_requests=2)")
        if req.request_id.startswith("bad"):
            raise ValueError(f"request {req.request_id} cannot run")
        add(req)

    core.add_request = add_request  # type: ignore[method-assign]
    return core

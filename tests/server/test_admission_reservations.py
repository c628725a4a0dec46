"""Admission holds a queue slot per admitted choice until it is submitted, so requests
admitted in the meantime cannot fill the queue under one already answered 200; the
gatekeeper frees slots never used when the HTTP request ends, however it ended."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import pytest

from tandem.scheduler.config import SchedulerConfig
from tandem.server.admission import Admission, Gatekeeper, Phase, ServerState
from tandem.server.errors import APIError
from tandem.server.metrics import ServerMetrics


@dataclass
class QueueView:
    """What Admission reads of a serving loop: its config and waiting count."""

    num_waiting: int = 0  # requests in (or posted to) the engine's waiting queue
    config: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(max_queued_requests=4))


def test_slots_are_held_until_submitted():
    loop = QueueView(num_waiting=1)
    admission = Admission(loop)  # type: ignore[arg-type]
    first = admission.admit(2)
    assert admission.reserved == 2
    with pytest.raises(APIError) as exc:
        admission.admit(2)  # 1 waiting + 2 held + 2 > 4
    assert exc.value.status == 429
    assert exc.value.headers["Retry-After"] == "1"
    first.take()  # submitted: now a waiting request, no longer a held slot
    loop.num_waiting += 1
    assert admission.reserved == 1
    with pytest.raises(APIError):
        admission.admit(2)  # still 2 + 1 + 2 > 4
    first.release()
    first.release()  # idempotent
    assert admission.reserved == 0
    admission.admit(2)


def test_more_choices_than_the_queue_is_a_400():
    admission = Admission(QueueView())  # type: ignore[arg-type]
    with pytest.raises(APIError) as exc:
        admission.admit(5)
    assert exc.value.status == 400 and exc.value.param == "n"
    assert admission.reserved == 0


@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_gatekeeper_frees_unused_slots_when_the_request_ends(ending):
    admission = Admission(QueueView())  # type: ignore[arg-type]

    async def app(scope, receive, send):
        admission.admit(3).take()  # one choice submitted, two never (a disconnect, say)
        assert admission.reserved == 2
        if ending == "raises":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = ServerState()
    state.phase = Phase.READY
    state.engine_alive = lambda: True
    gate = Gatekeeper(app, state, None, 1000, ServerMetrics("t"), lambda path: path)

    async def call():
        transport = httpx.ASGITransport(app=gate, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", content=b"{}")

    asyncio.run(call())
    assert admission.reserved == 0

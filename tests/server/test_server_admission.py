"""The Gatekeeper middleware (API key, phases, body limit, in-flight count) in front
of a minimal ASGI app, and ServerState's drain wait."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tandem.server.admission import Gatekeeper, Phase, ServerState
from tandem.server.metrics import ServerMetrics


async def echo_app(scope, receive, send):
    """Reads the whole body, answers 200 with its length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def gate(state: ServerState, api_key: str | None = None, limit: int = 100) -> Gatekeeper:
    metrics = ServerMetrics("test")
    return Gatekeeper(echo_app, state, api_key, limit, metrics, lambda path: path)


def ready_state() -> ServerState:
    state = ServerState()
    state.phase = Phase.READY
    state.engine_alive = lambda: True
    return state


async def post(app, path: str, body: bytes = b"{}", headers: dict | None = None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.post(path, content=body, headers=headers or {})


def run(coro):
    return asyncio.run(coro)


def test_api_key_required_except_health_and_metrics():
    app = gate(ready_state(), api_key="k")
    assert run(post(app, "/v1/completions")).status_code == 401
    assert (
        run(post(app, "/v1/completions", headers={"Authorization": "Bearer x"})).status_code == 401
    )
    assert (
        run(post(app, "/v1/completions", headers={"Authorization": "Bearer k"})).status_code == 200
    )
    assert (
        run(post(app, "/v1/completions", headers={"Authorization": "bearer k"})).status_code == 200
    )
    assert run(post(app, "/health")).status_code == 200
    assert run(post(app, "/metrics")).status_code == 200


@pytest.mark.parametrize("phase", [Phase.STARTING, Phase.DRAINING, Phase.STOPPED])
def test_not_ready_phases_get_503_but_health_passes_through(phase):
    state = ready_state()
    state.phase = phase
    r = run(post(gate(state), "/v1/chat/completions"))
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    assert run(post(gate(state), "/health")).status_code == 200  # the route decides


def test_dead_engine_gets_503():
    state = ready_state()
    state.engine_alive = lambda: False
    assert not state.accepting()
    assert run(post(gate(state), "/v1/models")).status_code == 503


def test_body_limit_by_length_and_while_streaming():
    app = gate(ready_state(), limit=10)
    assert run(post(app, "/v1/completions", b"x" * 10)).status_code == 200
    assert run(post(app, "/v1/completions", b"x" * 11)).status_code == 413

    async def chunks():
        for _ in range(3):
            yield b"x" * 6

    with pytest.raises(Exception, match="larger than the limit"):
        run(post(app, "/v1/completions", chunks()))


def test_in_flight_count_and_drain_wait():
    state = ready_state()

    async def scenario():
        release = asyncio.Event()

        async def slow_app(scope, receive, send):
            await release.wait()
            await echo_app(scope, receive, send)

        app = Gatekeeper(slow_app, state, None, 100, ServerMetrics("test"), str)
        request = asyncio.ensure_future(post(app, "/v1/completions"))
        await asyncio.sleep(0.05)
        assert state.in_flight == 1
        assert not await state.wait_idle(0.05)
        release.set()
        assert await state.wait_idle(2)
        assert (await request).status_code == 200 and state.in_flight == 0

    run(scenario())

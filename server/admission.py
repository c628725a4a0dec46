"""Who gets in: API key, server phase (starting / ready / draining), queue capacity
(429), body size; and the count of requests in flight that a drain waits for."""

from __future__ import annotations

import asyncio
import enum
import hmac
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.server.errors import APIError

if TYPE_CHECKING:
    from tandem.scheduler.loop import ServingLoop
    from tandem.server.metrics import ServerMetrics

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # no API key needed
UNGATED_PATHS = PUBLIC_PATHS | {"/version"}  # answered in every phase
# The reservations made while serving the current HTTP request (a per-request context
# value, not shared state): the gatekeeper sets a fresh list and releases what is left
# in it when the request is over, whichever way it ended.
_REQUEST_RESERVATIONS: ContextVar[list[Reservation] | None] = ContextVar(
    "tandem_request_reservations", default=None
)


class Phase(enum.IntEnum):
    STARTING = 0  # loading the model
    READY = 1
    DRAINING = 2  # SIGTERM: finishing in-flight requests, refusing new ones
    STOPPED = 3  # the engine is gone (shut down or died)


class ServerState:
    """Mutable state of one server: its phase and the requests in flight."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.in_flight = 0  # gated HTTP requests whose response has not finished
        self.startup_error: str | None = None  # why loading failed, if it did
        self.engine_alive: Callable[[], bool] = lambda: False  # the engine loop runs
        self._idle = asyncio.Event()  # set while in_flight == 0
        self._idle.set()

    def accepting(self) -> bool:
        """Ready for new requests: loaded, not draining, engine loop alive."""
        return self.phase == Phase.READY and self.engine_alive()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every in-flight request finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Reservation:
    """Waiting-queue slots held for the choices of one admitted HTTP request until each
    is submitted to the engine. A stream starts (and `n` > 1 siblings are submitted)
    after the admission check; without the hold, requests admitted meanwhile could
    fill the queue and a request already answered 200 would fail in-band."""

    __slots__ = ("_admission", "pending")

    def __init__(self, admission: Admission, count: int) -> None:
        self._admission = admission
        self.pending = count  # choices admitted but not yet submitted
        admission.reserved += count

    def take(self) -> None:
        """One choice is submitted now: its slot becomes a real entry of the queue.
        Call it right before `loop.generate` (no await between the two)."""
        if self.pending:
            self.pending -= 1
            self._admission.reserved -= 1

    def release(self) -> None:
        """The request is over: slots of choices never submitted are free again."""
        self._admission.reserved -= self.pending
        self.pending = 0


class Admission:
    """Capacity check before any engine request is submitted."""

    def __init__(self, loop: ServingLoop, retry_after_s: int = 1) -> None:
        self.loop = loop
        self.retry_after_s = retry_after_s  # the Retry-After a 429 suggests
        self.reserved = 0  # queue slots held by admitted, not yet submitted choices

    def admit(self, count: int = 1) -> Reservation:
        """Hold `count` queue slots (one per choice), or raise 429 (with Retry-After)
        when the engine's waiting queue cannot take them all."""
        limit = self.loop.config.max_queued_requests
        if count > limit:
            raise APIError(
                400,
                f"this request needs {count} engine requests (prompts x n); the server "
                f"queues at most {limit} (--max-queued-requests)",
                param="n",
            )
        if self.loop.num_waiting + self.reserved + count > limit:
            raise self.queue_full(self.retry_after_s)
        reservation = Reservation(self, count)
        holder = _REQUEST_RESERVATIONS.get()
        if holder is not None:
            holder.append(reservation)
        return reservation

    @staticmethod
    def queue_full(retry_after_s: int = 1) -> APIError:
        return APIError(
            429,
            "The server's request queue is full; retry after a short wait",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after_s)},
        )


def _phase_error(state: ServerState) -> APIError:
    if state.phase == Phase.STARTING:
        return APIError(503, "the server is starting; the model is not loaded yet")
    if state.phase == Phase.DRAINING:
        return APIError(503, "the server is shutting down and accepts no new requests")
    return APIError(503, "the engine is not running; see the server log")


class Gatekeeper:
    """ASGI middleware in front of every route.

    - API key: with one set, every path but /health and /metrics needs
      `Authorization: Bearer KEY` (compared in constant time), else 401.
    - Phase: outside READY, routes other than /health, /metrics, /version get 503.
    - Body size: a body over `max_body_bytes` gets 413 (by Content-Length, or as it
      streams in).
    - Counts requests in flight (a drain waits for them) and HTTP metrics.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        api_key: str | None,
        max_body_bytes: int,
        metrics: ServerMetrics,
        route_of: Callable[[str], str],
    ) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.route_of = route_of  # path -> bounded metric label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        error = self._refusal(scope, path)
        status = [500]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if error is not None:
                await error.response()(scope, receive, send_counted)
            elif path in UNGATED_PATHS:
                await self.app(scope, receive, send_counted)
            else:
                self.state.enter()
                reservations: list[Reservation] = []
                token = _REQUEST_RESERVATIONS.set(reservations)
                try:
                    await self.app(scope, self._limited(receive), send_counted)
                finally:
                    _REQUEST_RESERVATIONS.reset(token)
                    for r in reservations:
                        r.release()
                    self.state.leave()
        finally:
            self.metrics.count_http(self.route_of(path), status[0])

    def _refusal(self, scope: Scope, path: str) -> APIError | None:
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
            return APIError(
                401,
                "Missing or invalid API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )
        if path not in UNGATED_PATHS and not self.state.accepting():
            return _phase_error(self.state)
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        return None

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that raises 413 once the body passes the limit (chunked uploads)."""
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
            return message

        return wrapped


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than the limit of {limit} bytes")

"""The FastAPI app: routes, lifespan (load the engine off the event loop), drain.

    app = build_app(ServerConfig(...), start_engine, model_name="tandem-shakespeare")

`start_engine` runs in a worker thread while the server already answers: /health is
503 until it returns, 200 while the engine loop is alive, 503 again while draining.
If the engine dies (its process, a tensor-parallel rank, a step that timed out),
in-flight requests fail at once, /health turns 503 ("engine_dead"), and after
ENGINE_DEAD_EXIT_S `on_fatal` stops the server with a non-zero status (so an
orchestrator restarts it) instead of leaving it up with no engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from tandem.scheduler.loop import EngineDeadError
from tandem.scheduler.scheduler import QueueFullError
from tandem.server.admission import Admission, Gatekeeper, Phase, ServerState
from tandem.server.config import ServerConfig
from tandem.server.errors import APIError, bad_request, install_handlers
from tandem.server.metrics import CONTENT_TYPE, ServerMetrics
from tandem.server.outputs import EngineFailure, RequestAborted
from tandem.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_token_ids,
)
from tandem.server.serving import ClientDisconnected, ServingContext, as_api_error, check_model
from tandem.server.serving_chat import chat_prompt_ids, create_chat_completion
from tandem.server.serving_completions import create_completion
from tandem.server.stats_logger import StatsReporter
from tandem.server.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tandem.scheduler.loop import ServingLoop

logger = logging.getLogger("tandem.server")
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/version",
)
# Status code for a request whose client went away (nginx's convention; never sent).
CLIENT_CLOSED = 499
ENGINE_WATCH_S = 0.5  # how often the app checks that the engine loop is alive
ENGINE_DEAD_EXIT_S = 5.0  # after the engine died: /health says so this long, then exit


@dataclass(slots=True)
class ServingEngine:
    """A loaded engine, as the server needs it."""

    loop: ServingLoop  # not started yet: the app starts it on its event loop
    tokenizer: Tokenizer
    max_model_len: int  # prompt + output tokens per request


@dataclass(slots=True)
class AppDeps:
    """Everything a route reads, stored on `app.state.deps`."""

    config: ServerConfig
    model_name: str
    state: ServerState
    metrics: ServerMetrics
    created: int  # when the server started (unix seconds), for /v1/models
    ctx: ServingContext | None = None  # set once the engine is loaded


def build_app(
    config: ServerConfig,
    start_engine: Callable[[], ServingEngine],
    model_name: str,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The app. `start_engine` loads the engine (called in a worker thread; the app
    starts its loop); `on_fatal` is called when that fails, or when the engine dies
    later (the CLI then stops the server and exits non-zero)."""
    state = ServerState()
    deps = AppDeps(config, model_name, state, ServerMetrics(model_name), int(time.time()))
    log_interval = None if config.disable_log_stats else config.log_stats_interval

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(deps, start_engine, on_fatal))
        reporter = asyncio.create_task(StatsReporter(deps.metrics, log_interval).run())
        try:
            yield
        finally:
            for task in (loader, reporter):
                task.cancel()
            await asyncio.gather(loader, reporter, return_exceptions=True)
            await asyncio.to_thread(stop_engine, deps, config.shutdown_timeout)

    app = FastAPI(title="Tandem", lifespan=lifespan, openapi_url=None)
    app.state.deps = deps
    install_handlers(app)
    _install_engine_handlers(app)
    _add_routes(app, deps)
    known = frozenset(ROUTES)
    app.add_middleware(
        Gatekeeper,
        state=state,
        api_key=config.api_key,
        max_body_bytes=config.max_request_body_bytes,
        metrics=deps.metrics,
        route_of=lambda path: path if path in known else "other",
    )
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


async def _load(
    deps: AppDeps, start_engine: Callable[[], ServingEngine], on_fatal: Callable[[], None] | None
) -> None:
    """Load the engine in a worker thread, start its loop here; READY when done."""
    try:
        engine = await asyncio.to_thread(start_engine)
        engine.loop.start(asyncio.get_running_loop())
    except Exception as exc:
        logger.exception("failed to start the engine")
        deps.state.startup_error = str(exc)
        deps.state.phase = Phase.STOPPED
        if on_fatal is not None:
            on_fatal()
        return
    deps.ctx = ServingContext(
        engine.loop,
        engine.tokenizer,
        deps.model_name,
        engine.max_model_len,
        Admission(engine.loop),
        deps.metrics,
        deps.state,
        log_requests=not deps.config.disable_log_requests,
        tool_call_parser=deps.config.tool_call_parser,
    )
    deps.metrics.attach(engine.loop)
    deps.state.engine_alive = lambda: engine.loop.alive
    if deps.state.phase == Phase.STARTING:
        deps.state.phase = Phase.READY
        logger.info("engine ready: serving %s", deps.model_name)
    await _watch_engine(deps, on_fatal)


async def _watch_engine(deps: AppDeps, on_fatal: Callable[[], None] | None) -> None:
    """Return once the engine loop died while serving, after ENGINE_DEAD_EXIT_S (the
    loop has already failed every in-flight request), calling `on_fatal`. A drain or
    shutdown ends the watch without it."""
    while deps.state.phase == Phase.READY and deps.state.engine_alive():
        await asyncio.sleep(ENGINE_WATCH_S)
    if deps.state.phase != Phase.READY:
        return
    logger.error("the engine died; the server exits in %.0f s", ENGINE_DEAD_EXIT_S)
    await asyncio.sleep(ENGINE_DEAD_EXIT_S)
    if on_fatal is not None and deps.state.phase == Phase.READY:
        on_fatal()


def stop_engine(deps: AppDeps, timeout: float) -> None:
    """Shut the engine loop down (blocking); requests still running end aborted."""
    deps.state.phase = Phase.STOPPED
    if deps.ctx is not None:
        deps.ctx.loop.shutdown(timeout)


async def drain(app: FastAPI, timeout: float) -> bool:
    """Refuse new requests (503) and wait up to `timeout` s for in-flight ones.

    Returns True if all finished in time. /health reports 503 from the first moment.
    """
    deps: AppDeps = app.state.deps
    if deps.state.phase <= Phase.READY:  # also while still loading
        deps.state.phase = Phase.DRAINING
    logger.info("draining: %d requests in flight", deps.state.in_flight)
    done = await deps.state.wait_idle(timeout)
    if not done:
        logger.warning("shutdown timeout: aborting %d requests", deps.state.in_flight)
    return done


def _install_engine_handlers(app: FastAPI) -> None:
    async def engine_error(request: Request, exc: Exception) -> Response:
        state: ServerState = request.app.state.deps.state
        return as_api_error(exc, stopping=state.phase >= Phase.DRAINING).response()

    async def disconnected(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    for exc_type in (EngineFailure, RequestAborted, QueueFullError, EngineDeadError):
        app.add_exception_handler(exc_type, engine_error)
    app.add_exception_handler(ClientDisconnected, disconnected)


def _ctx(deps: AppDeps) -> ServingContext:
    if deps.ctx is None:  # the gate lets no request through before this is set
        raise APIError(503, "the server is starting; the model is not loaded yet")
    return deps.ctx


def _add_routes(app: FastAPI, deps: AppDeps) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate_json(await request.body())
        return await create_completion(_ctx(deps), req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate_json(await request.body())
        return await create_chat_completion(_ctx(deps), req, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        ctx = _ctx(deps)
        card = {"id": deps.model_name, "object": "model", "created": deps.created}
        card |= {"owned_by": "tandem", "max_model_len": ctx.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return _tokenize(_ctx(deps), TokenizeRequest.model_validate_json(await request.body()))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        ctx = _ctx(deps)
        req = DetokenizeRequest.model_validate_json(await request.body())
        check_model(ctx, req.model)
        check_token_ids(req.tokens, ctx.tokenizer.vocab_size, "tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.get("/health")
    async def health() -> Response:
        if deps.state.accepting():
            return Response(status_code=200)
        phase = deps.state.phase
        status = "engine_dead" if phase == Phase.READY else phase.name.lower()
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(deps.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version_route() -> dict[str, str]:
        return {"version": _version()}


def _tokenize(ctx: ServingContext, req: TokenizeRequest) -> dict[str, Any]:
    check_model(ctx, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`")
    if req.prompt is not None:
        if req.tools:
            raise bad_request("`tools` go with `messages`, not `prompt`", param="tools")
        ids = ctx.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        assert req.messages is not None
        ids = chat_prompt_ids(
            ctx,
            req.messages,
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
            [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
        )
    return {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len}


def _version() -> str:
    try:
        return version("tandem-serve")
    except PackageNotFoundError:
        return "unknown"

"""What completions and chat share: the model check, sampling parameters, `n` fan-out
into engine requests, admission, SSE responses and abort on client disconnect."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tandem.engine.plan import SamplingParams
from tandem.scheduler.loop import EngineDeadError
from tandem.scheduler.request import GenerateRequest
from tandem.scheduler.scheduler import QueueFullError
from tandem.server.admission import Admission, Phase, ServerState
from tandem.server.errors import APIError, bad_request
from tandem.server.logs import log_request
from tandem.server.metrics import ServerMetrics
from tandem.server.outputs import ChoiceDecoder, EngineFailure, RequestAborted
from tandem.server.protocol import (
    SamplingFields,
    check_token_ids,
    ignored_extra_fields,
    parse_logit_bias,
    unsupported_fields,
)
from tandem.server.responses import sse
from tandem.server.stops import StopMatcher
from tandem.server.structured_request import StructuredChecker
from tandem.server.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tandem.scheduler.loop import ServingLoop

logger = logging.getLogger("tandem.server")
T = TypeVar("T")


@dataclass(slots=True)
class ServingContext:
    """What every endpoint needs; one per running server."""

    loop: ServingLoop  # runs engine steps off the event loop
    tokenizer: Tokenizer
    model_name: str  # the served model name; requests naming another get a 404
    max_model_len: int  # prompt + output tokens per request
    admission: Admission
    metrics: ServerMetrics
    state: ServerState  # the server's phase (a drain turns aborts into 503s)
    log_requests: bool = True  # one INFO line per engine request that ends
    tool_call_parser: str = "hermes"  # how tool calls are read from chat outputs
    structured: StructuredChecker = field(default_factory=StructuredChecker)  # 400s
    # for constraints that do not compile, each distinct one compiled once

    @property
    def stopping(self) -> bool:
        return self.state.phase >= Phase.DRAINING

    @property
    def min_shared_prompt(self) -> int | None:
        """Prompts this long share their KV across `n` choices (one full block), or
        None when prefix caching is off."""
        loop = self.loop
        return loop.kv.block_size if loop.config.enable_prefix_caching else None


class ClientDisconnected(Exception):
    """The client went away before the response was complete."""


class SSEResponse(StreamingResponse):
    """A `text/event-stream` response that always closes its body iterator, so a
    disconnect at any point aborts the engine requests behind it at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self._iterator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._iterator.aclose()  # type: ignore[attr-defined]


def check_request(ctx: ServingContext, req: SamplingFields) -> None:
    """Model name, unsupported fields; logs fields that are accepted and ignored."""
    check_model(ctx, req.model)
    unsupported_fields(req)
    ignored = ignored_extra_fields(req)
    if ignored:
        logger.info("ignoring unknown request fields: %s", ", ".join(sorted(ignored)))


def check_model(ctx: ServingContext, model: str | None) -> None:
    """404 unless `model` is the served model's name (or left out)."""
    if model is not None and model != ctx.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{ctx.model_name}`",
            param="model",
            code="model_not_found",
        )


def resolve_max_tokens(
    ctx: ServingContext, prompt_len: int, requested: int | None, default: int | None
) -> int:
    """The output limit for one prompt, checked against the context window.

    `requested` is the client's value (a 400 if it does not fit); `default` applies
    when the client gave none (None = the rest of the context window).
    """
    room = ctx.max_model_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        asked = f" + max_tokens {requested}" if requested is not None else ""
        raise bad_request(
            f"This model's maximum context length is {ctx.max_model_len} tokens; the prompt "
            f"has {prompt_len} tokens{asked}. Shorten the prompt or lower max_tokens.",
            param="max_tokens" if requested is not None and room > 0 else "prompt",
        )
    if requested is not None:
        return requested
    return room if default is None else min(default, room)


def sampling_params(
    ctx: ServingContext,
    req: SamplingFields,
    max_tokens: int,
    seed: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    vocab = ctx.tokenizer.vocab_size
    stop_ids = list(req.stop_token_ids or [])
    check_token_ids(stop_ids, vocab, "stop_token_ids")
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            seed=seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=parse_logit_bias(req.logit_bias, vocab),
            min_tokens=min(req.min_tokens, max_tokens),
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
            stop_token_ids=stop_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def fan_out(
    ctx: ServingContext,
    req: SamplingFields,
    base_id: str,
    prompt_ids: list[int],
    first_index: int,
    params: SamplingParams,
) -> list[ChoiceDecoder]:
    """`n` engine requests for one prompt. A seeded request gives choice i the seed
    `seed + i`, so choice 0 equals the n=1 answer and the choices differ."""
    choices = []
    now = time.monotonic()
    for i in range(req.n):
        seed = None if req.seed is None else req.seed + i
        p = params if i == 0 else dataclasses.replace(params, seed=seed)
        engine_req = GenerateRequest(
            f"{base_id}-{first_index + i}",
            list(prompt_ids),
            p,
            now,
            max_draft_tokens=req.max_draft_tokens(),
        )
        stops = StopMatcher(req.stop_strings(), req.include_stop_str_in_output)
        choice = ChoiceDecoder(
            first_index + i, engine_req, ctx.tokenizer, stops, req.skip_special_tokens
        )
        choice.usage_detail = req.usage_detail
        choices.append(choice)
    return choices


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def created_now() -> int:
    return int(time.time())


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it (aborting its engine
    requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


def as_api_error(exc: Exception, stopping: bool = False) -> APIError:
    """The client-facing form of a failure; engine details stay in the log.

    `stopping`: the server is draining or stopped, so engine aborts are shutdown aborts.
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return Admission.queue_full()
    if isinstance(exc, EngineDeadError) or (stopping and isinstance(exc, EngineFailure)):
        return APIError(503, "the engine is not running (shutting down or failed)")
    if isinstance(exc, RequestAborted):
        return APIError(503, "the request was aborted because the server is shutting down")
    logger.error("request failed: %s", exc, exc_info=not isinstance(exc, EngineFailure))
    return APIError(500, "internal server error: the engine failed to complete the request")


def error_event(ctx: ServingContext, exc: Exception) -> bytes:
    """An in-band SSE error (the HTTP status was already sent with the stream's start)."""
    return sse(as_api_error(exc, ctx.stopping).body())


def precheck(ctx: ServingContext, choices: list[ChoiceDecoder]) -> None:
    """Refuse before any response starts: engine down (503), a request the engine can
    never run (400), a full queue (429). Admitted choices hold their queue slots until
    submitted, so a started stream meets no full queue later (unless preempted requests,
    which go back to the waiting queue, fill it meanwhile)."""
    if not ctx.loop.alive:
        raise APIError(503, "the engine is not running; see the server log")
    for c in choices:
        try:
            ctx.loop.check_request(c.request)
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt") from None
    reservation = ctx.admission.admit(len(choices))
    for c in choices:
        c.on_submit = reservation.take


def finish_choices(ctx: ServingContext, choices: list[ChoiceDecoder]) -> None:
    """Metrics and the log line of each choice, once, when its HTTP request is over
    (finished, failed, or its client gone: unfinished choices count as "abort")."""
    now = time.monotonic()
    for c in choices:
        if c.recorded:
            continue
        c.recorded = True
        c.times.end(now)
        reason = c.finish_reason or "abort"
        num_prompt = len(c.request.prompt_token_ids)
        ctx.metrics.observe_request(c.times, num_prompt, c.num_output_tokens, reason)
        if ctx.log_requests:
            log_request(
                c.request.request_id,
                c.times,
                num_prompt,
                c.num_output_tokens,
                reason,
                c.num_cached_tokens,
            )

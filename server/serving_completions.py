"""POST /v1/completions: prompts (text or token ids) -> choices, streamed or not;
`response_format` / `structured_outputs` / `guided_*` constrain them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tandem.server.errors import bad_request
from tandem.server.outputs import ChoiceDecoder, ChoiceDelta, choice_deltas
from tandem.server.protocol import CompletionRequest, check_token_ids
from tandem.server.responses import (
    SSE_DONE,
    CompletionLogprobs,
    add_speculation_usage,
    envelope,
    merge_completion_logprobs,
    sse,
    usage,
)
from tandem.server.serving import (
    ServingContext,
    SSEResponse,
    cancel_on_disconnect,
    check_request,
    created_now,
    error_event,
    fan_out,
    finish_choices,
    new_id,
    precheck,
    resolve_max_tokens,
    sampling_params,
)
from tandem.server.structured_request import structured_output

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(slots=True)
class PromptInfo:
    """One prompt of the request, as the choices that share it see it."""

    token_ids: list[int]
    text: str  # for echo: the prompt as given, or decoded from ids


@dataclass(slots=True)
class ChoiceText:
    """A completion choice being assembled (text + logprobs), streamed or not."""

    prompt: PromptInfo
    logprobs: CompletionLogprobs | None  # builder, when logprobs were asked
    echo_pending: bool  # the prompt still has to be prepended
    text: list[str] = field(default_factory=list)
    logprob_parts: list[dict[str, Any]] = field(default_factory=list)


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request) -> Response:
    check_request(ctx, req)
    structured = structured_output(req, ctx.structured)
    prompts = _tokenize_prompts(ctx, req)
    response_id = new_id("cmpl")
    choices: list[ChoiceDecoder] = []
    texts: dict[int, ChoiceText] = {}
    for p_index, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            ctx, len(prompt.token_ids), req.max_tokens, DEFAULT_MAX_TOKENS
        )
        prompt_lps = req.logprobs if req.echo and req.logprobs is not None else None
        params = sampling_params(ctx, req, max_tokens, req.seed, req.logprobs, prompt_lps)
        params = dataclasses.replace(params, structured=structured)
        for c in fan_out(ctx, req, response_id, prompt.token_ids, p_index * req.n, params):
            choices.append(c)
            builder = CompletionLogprobs(ctx.tokenizer) if req.logprobs is not None else None
            texts[c.index] = ChoiceText(prompt, builder, req.echo)
    precheck(ctx, choices)
    num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
    ctx.metrics.count_prompt_tokens(num_prompt_tokens)
    head = envelope("text_completion", response_id, created_now(), ctx.model_name)
    if req.stream:
        usage_n = req.n if req.include_usage() else None
        stream = _stream(ctx, choices, texts, head, num_prompt_tokens, usage_n)
        return SSEResponse(stream)
    await cancel_on_disconnect(raw, _collect(ctx, choices, texts))
    body = dict(head)
    body["choices"] = [_final_choice(c, texts[c.index]) for c in choices]
    body["usage"] = _usage(choices, num_prompt_tokens, req.n)
    return JSONResponse(body)


def _tokenize_prompts(ctx: ServingContext, req: CompletionRequest) -> list[PromptInfo]:
    out = []
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            ids = ctx.tokenizer.encode(p, add_special_tokens=True)
            info = PromptInfo(ids, p)
        else:
            check_token_ids(p, ctx.tokenizer.vocab_size, "prompt")
            info = PromptInfo(list(p), ctx.tokenizer.decode(list(p)))
        if not info.token_ids:
            raise bad_request(f"prompt {i} is empty", param="prompt")
        out.append(info)
    return out


def _delta_text(choice: ChoiceText, delta: ChoiceDelta) -> tuple[str, dict[str, Any] | None]:
    """The text and logprobs this delta adds to the choice (echo goes first, once)."""
    text = delta.text
    lp_entries: list[Any] = []
    lp_ids: list[int] = []
    if choice.echo_pending:
        choice.echo_pending = False
        text = choice.prompt.text + text
        if delta.prompt_logprobs is not None:
            lp_entries.extend(delta.prompt_logprobs)
            lp_ids.extend(choice.prompt.token_ids)
        elif choice.logprobs is not None:
            choice.logprobs.offset = len(choice.prompt.text)
    if delta.logprobs is not None:
        lp_entries.extend(delta.logprobs)
        lp_ids.extend(delta.token_ids)
    logprobs = None
    if choice.logprobs is not None:
        logprobs = choice.logprobs.build(lp_entries, lp_ids)
    return text, logprobs


async def _collect(
    ctx: ServingContext, choices: list[ChoiceDecoder], texts: dict[int, ChoiceText]
) -> None:
    try:
        async for choice, delta in choice_deltas(ctx.loop, choices, ctx.min_shared_prompt):
            t = texts[choice.index]
            text, logprobs = _delta_text(t, delta)
            t.text.append(text)
            if logprobs is not None:
                t.logprob_parts.append(logprobs)
    finally:
        finish_choices(ctx, choices)


def _final_choice(choice: ChoiceDecoder, t: ChoiceText) -> dict[str, Any]:
    return {
        "index": choice.index,
        "text": "".join(t.text),
        "logprobs": merge_completion_logprobs(t.logprob_parts),
        "finish_reason": choice.finish_reason,
    }


def _usage(choices: list[ChoiceDecoder], num_prompt_tokens: int, n: int) -> dict[str, Any]:
    # The n choices of a prompt (indexes p*n .. p*n+n-1) share its cached prefix.
    cached: dict[int, int] = {}
    for c in choices:
        cached[c.index // n] = max(cached.get(c.index // n, 0), c.num_cached_tokens)
    u = usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices), sum(cached.values()))
    return add_speculation_usage(u, choices)


async def _stream(
    ctx: ServingContext,
    choices: list[ChoiceDecoder],
    texts: dict[int, ChoiceText],
    head: dict[str, Any],
    num_prompt_tokens: int,
    usage_n: int | None,
) -> AsyncIterator[bytes]:
    """SSE chunks; with `usage_n` (the request's n) a last chunk with the usage."""
    try:
        async for choice, delta in choice_deltas(ctx.loop, choices, ctx.min_shared_prompt):
            text, logprobs = _delta_text(texts[choice.index], delta)
            if not text and logprobs is None and delta.finish_reason is None:
                continue
            chunk = dict(head)
            item = {"index": choice.index, "text": text, "logprobs": logprobs}
            item["finish_reason"] = delta.finish_reason
            chunk["choices"] = [item]
            yield sse(chunk)
        finish_choices(ctx, choices)
        if usage_n is not None:
            yield sse(head | {"choices": [], "usage": _usage(choices, num_prompt_tokens, usage_n)})
    except Exception as exc:
        yield error_event(ctx, exc)
    finally:
        finish_choices(ctx, choices)  # a failure or a disconnect: the rest are aborts
    yield SSE_DONE

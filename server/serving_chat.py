"""POST /v1/chat/completions: messages -> chat template -> choices, streamed or not.
With tools, the output is read for tool calls (`tool_output.py`); structured output
and forced tool calls constrain it (`structured_request.py`, `tools.py`)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tandem.server.errors import bad_request
from tandem.server.outputs import ChoiceDecoder, ChoiceDelta, choice_deltas
from tandem.server.protocol import ChatCompletionRequest, ChatMessage
from tandem.server.responses import (
    SSE_DONE,
    add_speculation_usage,
    chat_logprobs_content,
    envelope,
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
from tandem.server.tokenizer import TokenizerError
from tandem.server.tool_output import ToolStream, final_message, tool_finish_reason
from tandem.server.tools import ToolPlan, plan_tools

RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "tools",
    }
)


def chat_prompt_ids(
    ctx: ServingContext,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The conversation's prompt ids via the chat template (`tools` rendered into it
    when given); template problems -> 400."""
    bad = RESERVED_TEMPLATE_KWARGS & set(template_kwargs or {})
    if bad:
        raise bad_request(
            f"chat_template_kwargs may not set {sorted(bad)}", param="chat_template_kwargs"
        )
    kwargs = dict(template_kwargs or {}) | ({"tools": tools} if tools else {})
    try:
        ids = ctx.tokenizer.encode_chat(
            [m.template_dict() for m in messages],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=kwargs,
        )
    except TokenizerError as exc:
        raise bad_request(str(exc), param="messages") from None
    if not ids:
        raise bad_request("the chat template produced an empty prompt", param="messages")
    return ids


async def create_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest, raw: Request
) -> Response:
    check_request(ctx, req)
    tools = plan_tools(req, ctx.tool_call_parser, ctx.structured)
    structured = structured_output(req, ctx.structured, tools.forced)
    ids = chat_prompt_ids(
        ctx,
        req.messages,
        req.add_generation_prompt,
        req.continue_final_message,
        req.chat_template_kwargs,
        tools.rendered,
    )
    max_tokens = resolve_max_tokens(ctx, len(ids), req.output_limit(), None)
    num_top = req.top_logprobs or 0
    params = sampling_params(ctx, req, max_tokens, req.seed, num_top if req.logprobs else None)
    params = dataclasses.replace(params, structured=structured)
    response_id = new_id("chatcmpl")
    choices = fan_out(ctx, req, response_id, ids, 0, params)
    precheck(ctx, choices)
    ctx.metrics.count_prompt_tokens(len(ids))
    head = envelope("chat.completion", response_id, created_now(), ctx.model_name)
    if req.stream:
        head["object"] = "chat.completion.chunk"
        stream = _stream(ctx, choices, head, len(ids), num_top, req.include_usage(), tools)
        return SSEResponse(stream)
    parts: dict[int, list[str]] = {c.index: [] for c in choices}
    lps: dict[int, list[dict[str, Any]] | None] = {c.index: None for c in choices}
    if req.logprobs:
        lps = {c.index: [] for c in choices}
    await cancel_on_disconnect(raw, _collect(ctx, choices, parts, lps, num_top))
    body = dict(head)
    body["choices"] = [
        _final_choice(c, "".join(parts[c.index]), lps[c.index], tools) for c in choices
    ]
    body["usage"] = _usage(choices, len(ids))
    return JSONResponse(body)


def _final_choice(
    c: ChoiceDecoder, text: str, lps: list[dict[str, Any]] | None, tools: ToolPlan
) -> dict[str, Any]:
    message, has_calls = final_message(text, tools)
    return {
        "index": c.index,
        "message": message,
        "logprobs": None if lps is None else {"content": lps, "refusal": None},
        "finish_reason": tool_finish_reason(c.finish_reason, has_calls),
    }


async def _collect(
    ctx: ServingContext,
    choices: list[ChoiceDecoder],
    parts: dict[int, list[str]],
    lps: dict[int, list[dict[str, Any]] | None],
    num_top: int,
) -> None:
    try:
        async for choice, delta in choice_deltas(ctx.loop, choices, ctx.min_shared_prompt):
            parts[choice.index].append(delta.text)
            items = lps[choice.index]
            if items is not None and delta.logprobs:
                items.extend(chat_logprobs_content(ctx.tokenizer, delta.logprobs, num_top))
    finally:
        finish_choices(ctx, choices)


def _usage(choices: list[ChoiceDecoder], num_prompt_tokens: int) -> dict[str, Any]:
    cached = max((c.num_cached_tokens for c in choices), default=0)
    u = usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices), cached)
    return add_speculation_usage(u, choices)


def _chunk(head: dict[str, Any], index: int, delta: dict[str, Any], **extra: Any) -> bytes:
    item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None} | extra
    return sse(head | {"choices": [item]})


def _delta_chunk(
    ctx: ServingContext,
    head: dict[str, Any],
    choice: ChoiceDecoder,
    d: ChoiceDelta,
    num_top: int,
    tool_stream: ToolStream | None,
) -> bytes | None:
    """The chunk for one delta, or None when it adds nothing the client can see."""
    want_lps = choice.request.sampling.logprobs is not None
    if not d.text and d.finish_reason is None and not (want_lps and d.logprobs):
        return None
    finish_reason = d.finish_reason
    if tool_stream is None:
        delta: dict[str, Any] = {"content": d.text} if d.text else {}
    else:
        delta = tool_stream.delta(d.text, d.finish_reason is not None)
        finish_reason = tool_finish_reason(finish_reason, tool_stream.num_calls > 0)
    if not delta and finish_reason is None and not (want_lps and d.logprobs):
        return None
    logprobs = None
    if want_lps:
        items = chat_logprobs_content(ctx.tokenizer, d.logprobs or [], num_top)
        logprobs = {"content": items, "refusal": None}
    return _chunk(head, choice.index, delta, logprobs=logprobs, finish_reason=finish_reason)


async def _stream(
    ctx: ServingContext,
    choices: list[ChoiceDecoder],
    head: dict[str, Any],
    num_prompt_tokens: int,
    num_top: int,
    include_usage: bool,
    tools: ToolPlan,
) -> AsyncIterator[bytes]:
    streams = {c.index: ToolStream(tools) for c in choices} if tools.parser else {}
    try:
        for c in choices:  # the first chunk of each choice carries the role
            yield _chunk(head, c.index, {"role": "assistant", "content": ""})
        async for choice, delta in choice_deltas(ctx.loop, choices, ctx.min_shared_prompt):
            tool_stream = streams.get(choice.index)
            chunk = _delta_chunk(ctx, head, choice, delta, num_top, tool_stream)
            if chunk is not None:
                yield chunk
        finish_choices(ctx, choices)
        if include_usage:
            yield sse(head | {"choices": [], "usage": _usage(choices, num_prompt_tokens)})
    except Exception as exc:
        yield error_event(ctx, exc)
    finally:
        finish_choices(ctx, choices)  # a failure or a disconnect: the rest are aborts
    yield SSE_DONE

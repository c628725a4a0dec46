"""From engine outputs to text: one `ChoiceDecoder` per choice, and the merged stream
of all choices of one HTTP request (`n` fan-out, several prompts).

Per output the work is O(new tokens): a bounded detokenizer window and a stop-string
check over at most the longest stop string.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.engine.plan import TokenLogprobs
from tandem.scheduler.request import GenerateRequest, RequestOutput
from tandem.server.request_stats import RequestTimes
from tandem.server.stops import StopMatcher
from tandem.server.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from tandem.scheduler.loop import ServingLoop


class EngineFailure(RuntimeError):
    """The engine failed a request (its message is for the log, not the client)."""


class RequestAborted(RuntimeError):
    """The engine aborted a request the server did not cancel (shutdown, lost engine)."""


@dataclass(slots=True)
class ChoiceDelta:
    """What one engine output adds to one choice."""

    text: str  # newly released text ("" while held back)
    token_ids: list[int]  # output tokens that arrived (the eos/stop token excluded)
    logprobs: list[TokenLogprobs] | None  # one per token_ids entry, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None  # once, with the first delta
    finish_reason: str | None  # "stop" | "length" on the choice's last delta


@dataclass(slots=True)
class ChoiceDecoder:
    """Turns one request's `RequestOutput`s into text deltas: incremental
    detokenization, stop strings (cut, the request then aborted by the caller)."""

    index: int  # the choice's index in the response
    request: GenerateRequest  # what the engine runs for this choice
    tokenizer: Tokenizer
    stops: StopMatcher
    skip_special_tokens: bool = True
    finish_reason: str | None = None  # set once the choice is complete
    num_output_tokens: int = 0  # tokens the engine generated for this choice
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    num_draft_tokens: int = 0  # speculative drafts verified for this choice
    num_accepted_draft_tokens: int = 0  # of those, accepted
    usage_detail: bool = False  # the request asked for usage["speculation"]
    detok: IncrementalDetokenizer = field(init=False, repr=False)  # this choice's text
    times: RequestTimes = field(init=False, repr=False)  # when its outputs arrived
    recorded: bool = False  # its metrics and log line are done
    # Called right before its engine request is submitted (admission's slot is taken).
    on_submit: Callable[[], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.detok = self.tokenizer.detokenizer(
            self.request.prompt_token_ids, self.skip_special_tokens
        )
        self.times = RequestTimes(arrival=self.request.arrival_time)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> ChoiceDelta:
        self.times.record(out, time.monotonic())
        if out.error is not None:
            raise EngineFailure(f"request {out.request_id} failed: {out.error}")
        if out.finished and out.finish_reason == "abort":
            raise RequestAborted(f"request {out.request_id} was aborted by the engine")
        ids = out.new_token_ids
        self.num_output_tokens += len(ids)
        self.num_cached_tokens = out.num_cached_tokens
        self.num_draft_tokens = out.num_draft_tokens
        self.num_accepted_draft_tokens = out.num_accepted_draft_tokens
        logprobs = out.new_logprobs
        if out.stop_token_id is not None and ids and ids[-1] == out.stop_token_id:
            ids = ids[:-1]
            logprobs = logprobs[: len(ids)] if logprobs is not None else None
        text = self.detok.push(ids)
        if out.finished:
            text += self.detok.flush()
        text, matched = self.stops.push(text)
        if matched:
            self.finish_reason = "stop"
        elif out.finished:
            text += self.stops.flush()
            self.finish_reason = out.finish_reason or "stop"
        return ChoiceDelta(text, ids, logprobs, out.prompt_logprobs, self.finish_reason)


async def _single(loop: ServingLoop, choice: ChoiceDecoder) -> AsyncIterator[ChoiceDelta]:
    """One choice's deltas; leaving early (stop string, disconnect) aborts the request."""
    if choice.on_submit is not None:
        choice.on_submit()  # no await until generate() has counted it as waiting
    async with aclosing(loop.generate(choice.request)) as outputs:
        async for out in outputs:
            delta = choice.update(out)
            yield delta
            if choice.finished:
                return


async def choice_deltas(
    loop: ServingLoop, choices: list[ChoiceDecoder], min_shared_prompt: int | None = None
) -> AsyncIterator[tuple[ChoiceDecoder, ChoiceDelta]]:
    """The deltas of all choices, interleaved as they arrive.

    With `min_shared_prompt` (prefix caching on; the block size), choices that share a
    prompt of at least that many tokens start once the first of them has its first
    output: its prompt KV is then in the prefix cache, and the others reuse it instead
    of each computing the prompt again in the same step.

    Closing this iterator (a client disconnect cancels it) aborts every request still
    running. An engine failure in any choice raises here and aborts the others.
    """
    if len(choices) == 1:
        async with aclosing(_single(loop, choices[0])) as deltas:
            async for delta in deltas:
                yield choices[0], delta
        return
    queue: asyncio.Queue[tuple[ChoiceDecoder, ChoiceDelta] | BaseException | None]
    queue = asyncio.Queue()
    waits, sets = _prompt_leaders(choices, min_shared_prompt)

    async def pump(choice: ChoiceDecoder) -> None:
        started = sets.get(id(choice))  # set when this prompt leader has output
        try:
            if id(choice) in waits:
                await waits[id(choice)].wait()
            async with aclosing(_single(loop, choice)) as deltas:
                async for delta in deltas:
                    queue.put_nowait((choice, delta))
                    if started is not None:
                        started.set()
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)
        finally:
            if started is not None:
                started.set()
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _prompt_leaders(
    choices: list[ChoiceDecoder], min_shared_prompt: int | None
) -> tuple[dict[int, asyncio.Event], dict[int, asyncio.Event]]:
    """(waits, sets): id(follower) -> the event it waits for; id(the first choice of
    each shared prompt) -> the event it sets once it has output (or has ended)."""
    waits: dict[int, asyncio.Event] = {}
    sets: dict[int, asyncio.Event] = {}
    if min_shared_prompt is None:
        return waits, sets
    first: dict[tuple[int, ...], ChoiceDecoder] = {}
    for c in choices:
        prompt = c.request.prompt_token_ids
        if len(prompt) < min_shared_prompt:
            continue
        leader = first.setdefault(tuple(prompt), c)
        if leader is not c:
            waits[id(c)] = sets.setdefault(id(leader), asyncio.Event())
    return waits, sets

"""The offline batch API: the same engine, tokenizer, chat template and detokenizer as
the HTTP server, driven synchronously from the caller's thread.

    from tandem.server.llm import LLM
    from tandem.engine.plan import SamplingParams

    llm = LLM()                                   # the built-in Shakespeare model
    outs = llm.generate(["ROMEO:\\n"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text, outs[0].outputs[0].finish_reason)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.config import EngineConfig
from tandem.engine.plan import SamplingParams, TokenLogprobs
from tandem.engine.spec_config import SpeculativeConfig
from tandem.scheduler.config import SchedulerConfig
from tandem.scheduler.request import GenerateRequest
from tandem.server.build import build_engine
from tandem.server.outputs import ChoiceDecoder
from tandem.server.stops import StopMatcher

Prompt = str | list[int]


@dataclass(slots=True)
class CompletionOutput:
    """One choice of one prompt."""

    index: int  # 0 .. n-1
    text: str  # generated text, stop strings cut (unless included)
    token_ids: list[int]  # generated tokens (a finishing eos/stop token excluded)
    finish_reason: str | None  # "stop" | "length"
    logprobs: list[TokenLogprobs] | None = None  # one per token, when asked


@dataclass(slots=True)
class GenerationOutput:
    """Everything generated for one prompt."""

    prompt: str | None  # the prompt text (None when given as token ids)
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # n choices, by index
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when asked
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass(slots=True)
class _Choice:
    decoder: ChoiceDecoder
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """Offline generation. Keyword arguments are `EngineConfig`, `SchedulerConfig` and
    `SpeculativeConfig` fields (e.g. `dtype="float32"`, `max_num_batched_tokens=512`,
    `speculative_method="ngram"`)."""

    def __init__(self, model: str | None = None, chat_template: str | None = None, **kwargs):
        engine_kw, sched_kw, spec_kw = _split_kwargs(kwargs)
        self.engine = build_engine(
            EngineConfig(model=model, **engine_kw),
            SchedulerConfig(**sched_kw),
            chat_template,
            spec=SpeculativeConfig(**spec_kw) if spec_kw else None,
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        n: int = 1,
        stop: str | list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> list[GenerationOutput]:
        """Generate for every prompt (text, or token ids) and return in prompt order."""
        prompts = _as_prompt_list(prompts)
        params = _broadcast(sampling_params or SamplingParams(), len(prompts))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        results, choices = [], []
        for prompt, sp in zip(prompts, params, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            res = GenerationOutput(prompt if isinstance(prompt, str) else None, ids, [])
            results.append(res)
            for i in range(n):
                choices.append(
                    (res, self._submit(ids, sp, i, n, stops, include_stop_str_in_output))
                )
        self._run([c for _, c in choices])
        for res, c in choices:
            res.outputs.append(
                CompletionOutput(
                    c.decoder.index,
                    "".join(c.text),
                    c.token_ids,
                    c.decoder.finish_reason,
                    c.logprobs,
                )
            )
            res.prompt_logprobs = res.prompt_logprobs or c.prompt_logprobs
            res.num_cached_tokens = max(res.num_cached_tokens, c.decoder.num_cached_tokens)
        return results

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> GenerationOutput:
        """One conversation through the model's chat template (generation prompt added)."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([ids], sampling_params, **kwargs)[0]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _submit(self, ids, sp, index, n, stops, include_stop) -> _Choice:
        if n > 1 and sp.seed is not None:  # distinct but reproducible choices
            sp = dataclasses.replace(sp, seed=sp.seed + index)
        req = GenerateRequest(f"llm-{next(self._ids)}", ids, sp, time.time())
        self.engine.core.add_request(req)
        decoder = ChoiceDecoder(index, req, self.tokenizer, StopMatcher(stops, include_stop))
        return _Choice(decoder, logprobs=[] if sp.logprobs is not None else None)

    def _run(self, choices: list[_Choice]) -> None:
        by_id = {c.decoder.request.request_id: c for c in choices}
        core = self.engine.core
        while core.has_unfinished():
            for out in core.step():
                c = by_id.get(out.request_id)
                if c is None or c.decoder.finished:
                    continue
                delta = c.decoder.update(out)
                c.text.append(delta.text)
                c.token_ids.extend(delta.token_ids)
                if c.logprobs is not None and delta.logprobs:
                    c.logprobs.extend(delta.logprobs)
                if delta.prompt_logprobs is not None:
                    c.prompt_logprobs = delta.prompt_logprobs
                if c.decoder.finished and not out.finished:  # a stop string matched
                    core.abort_request(out.request_id)


def _split_kwargs(
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    sched_fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    spec_fields = {f.name for f in dataclasses.fields(SpeculativeConfig)}
    unknown = set(kwargs) - engine_fields - sched_fields - spec_fields
    if unknown:
        raise TypeError(f"LLM() got unknown arguments: {', '.join(sorted(unknown))}")
    return (
        {k: v for k, v in kwargs.items() if k in engine_fields},
        {k: v for k, v in kwargs.items() if k in sched_fields},
        {k: v for k, v in kwargs.items() if k in spec_fields},
    )


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # one prompt of token ids
    return list(prompts)


def _broadcast(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return list(params)

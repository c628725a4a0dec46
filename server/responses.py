"""OpenAI response bodies as plain dicts, and SSE framing.

Shapes follow the official OpenAI schemas (`CreateCompletionResponse`,
`CreateChatCompletionResponse`, `CreateChatCompletionStreamResponse`); the tests
validate them against `openai-openapi.yaml`. Dicts rather than pydantic models: these
are built once per step per streamed choice, and `json.dumps` of a dict is the cheapest
route to bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tandem.engine.plan import TokenLogprobs
from tandem.server.tokenizer import Tokenizer

# OpenAI's stand-in for a logprob too small to represent (JSON has no -Infinity).
MIN_LOGPROB = -9999.0
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event: `data: {json}\\n\\n`."""
    return b"data: " + dumps(obj) + b"\n\n"


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def add_speculation_usage(u: dict[str, Any], choices: Sequence[Any]) -> dict[str, Any]:
    """usage["speculation"] when the request asked for `usage_detail`: the drafts
    verified for it over all its choices (`ChoiceDecoder`s), those accepted, and their
    ratio (0 with no drafts). Returns u."""
    if choices and choices[0].usage_detail:
        drafts = sum(c.num_draft_tokens for c in choices)
        accepted = sum(c.num_accepted_draft_tokens for c in choices)
        u["speculation"] = {
            "draft_tokens": drafts,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else 0.0,
        }
    return u


def envelope(obj_type: str, response_id: str, created: int, model: str) -> dict[str, Any]:
    return {"id": response_id, "object": obj_type, "created": created, "model": model}


def clamp_logprob(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else float(x)


class CompletionLogprobs:
    """Builds the completions `logprobs` object (tokens, token_logprobs, top_logprobs,
    text_offset) incrementally; `text_offset` continues across streamed chunks."""

    def __init__(self, tokenizer: Tokenizer, start_offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.offset = start_offset  # character offset of the next token in the choice text

    def build(self, entries: list[TokenLogprobs | None], token_ids: list[int]) -> dict[str, Any]:
        """`entries[i]` describes `token_ids[i]`; None (the first prompt token) -> null."""
        tok = self.tokenizer.token_str
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        offsets: list[int] = []
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = tok(token_id)
            out["tokens"].append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(clamp_logprob(entry.logprob))
            out["top_logprobs"].append({tok(t): clamp_logprob(lp) for t, lp in entry.top})
        out["text_offset"] = offsets
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    merged: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
    merged["text_offset"] = []
    for p in parts:
        for key in merged:
            merged[key].extend(p[key])
    return merged


def chat_logprobs_content(
    tokenizer: Tokenizer, entries: list[TokenLogprobs], num_top: int
) -> list[dict[str, Any]]:
    """The chat `logprobs.content` items for sampled tokens, with `num_top` alternatives."""
    tok, raw = tokenizer.token_str, tokenizer.token_bytes
    items = []
    for e in entries:
        top = [
            {"token": tok(t), "logprob": clamp_logprob(lp), "bytes": raw(t)}
            for t, lp in e.top[:num_top]
        ]
        items.append(
            {
                "token": tok(e.token_id),
                "logprob": clamp_logprob(e.logprob),
                "bytes": raw(e.token_id),
                "top_logprobs": top,
            }
        )
    return items

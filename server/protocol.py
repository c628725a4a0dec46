"""OpenAI request schemas (pydantic v2), with the extensions vLLM users rely on.

Only requests are pydantic models; responses are plain dicts built in `responses.py`
(checked against the official OpenAI schemas by the tests). Unknown fields are
accepted and logged, as the OpenAI API accepts fields newer than a server; fields
whose behaviour Tandem does not implement (`suffix`, `best_of` > 1, `tools` on
/v1/completions, ...) are rejected with a 400 by `unsupported_fields`, never ignored.
Structured output and tool schemas live in `protocol_structured.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator

from tandem.server.errors import APIError, bad_request, not_supported
from tandem.server.protocol_structured import (
    ResponseFormat,
    StructuredOutputsOptions,
    ToolCallIn,
    ToolChoice,
    ToolDef,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False  # send a last chunk with `usage` and empty `choices`


class SpeculationOptions(BaseModel):
    """Per-request speculative decoding control (a Tandem extension):
    `{"max_k": N}` caps the drafts this request may get per step (0 = none) below the
    server's --num-speculative-tokens; `{"mode": "off"}` turns speculation off for it."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "off"] = "auto"  # auto: the server's policy decides k
    max_k: int | None = Field(None, ge=0)  # cap on k per step; None = the server's K

    def max_draft_tokens(self) -> int | None:
        return 0 if self.mode == "off" else self.max_k


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None = the served model
    n: int = Field(1, ge=1, le=128)  # choices to generate per prompt
    max_tokens: int | None = Field(None, ge=0)  # None: endpoint default
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None = 1.0
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # 0 or -1 = off
    min_p: Probability | None = None
    seed: int | None = None  # choice i of n uses seed + i
    stop: str | list[str] | None = None  # stop strings, matched across token boundaries
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # drop special tokens from the text
    user: str | None = None  # accepted, unused
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculation: SpeculationOptions | None = None  # per-request speculation control
    usage_detail: bool = False  # usage gets "speculation": drafts verified and accepted
    # Structured output: at most one of these (`structured_request.py` maps them).
    response_format: ResponseFormat | None = None  # OpenAI: text, json_object, json_schema
    structured_outputs: StructuredOutputsOptions | None = None  # vLLM extension
    guided_json: dict[str, Any] | str | None = None  # older vLLM names of the same
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def max_draft_tokens(self) -> int | None:
        return None if self.speculation is None else self.speculation.max_draft_tokens()

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False  # prepend the prompt (and its logprobs) to each choice
    logprobs: int | None = Field(None, ge=0, le=20)  # top-N alternatives per token
    best_of: int | None = None  # only 1 (or absent) is supported
    suffix: str | None = None  # not supported

    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        if not all(isinstance(x, type(p[0])) for x in p):
            raise bad_request("prompt must not mix strings and token lists", param="prompt")
        return list(p)  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant only; content may then be null
    tool_call_id: str | None = Field(None, validate_default=True)  # tool only, required

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role == "tool" and not value:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if role != "tool" and value is not None:
            raise ValueError("only tool messages carry a tool_call_id")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(
        cls, value: list[ToolCallIn] | None, info: ValidationInfo
    ) -> list[ToolCallIn] | None:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (developer is sent as system; tool
        call arguments as dicts)."""
        role = "system" if self.role == "developer" else self.role
        content: Any = self.content or ""
        if isinstance(self.content, list):
            content = [{"type": "text", "text": p.text} for p in self.content]
        out = {"role": role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # preferred over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None  # functions the model may call
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, else "none"
    parallel_tool_calls: bool = True  # False: at most one call per answer

    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )


class TokenizeRequest(BaseModel):
    """POST /tokenize: either `prompt` or chat `messages`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`
    add_generation_prompt: bool = True  # for `messages`
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None  # for `messages`: rendered as a chat completion does


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: TokenIds


# Fields that change behaviour in ways Tandem does not implement yet: a 400, never ignored.
# Each maps to the values that are harmless (equivalent to leaving the field out).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "logit_bias_type": (None,),
    "use_beam_search": (None, False),
}


def unsupported_fields(req: SamplingFields) -> None:
    """Raise a 400 for any field whose behaviour is not implemented."""
    extra = req.model_extra or {}
    for name, harmless in _UNSUPPORTED.items():
        if name in extra and extra[name] not in harmless:
            raise not_supported(name)
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise not_supported("best_of", "`best_of` other than 1")
        if req.suffix is not None:
            raise not_supported("suffix")
    chat = isinstance(req, ChatCompletionRequest)
    if chat and req.top_logprobs is not None and not req.logprobs:  # type: ignore[attr-defined]
        raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")


def ignored_extra_fields(req: BaseModel) -> list[str]:
    """Unknown fields the server accepts and ignores (logged by the caller)."""
    return [k for k in (req.model_extra or {}) if k not in _UNSUPPORTED]


def parse_logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """{"123": 5.0} -> {123: 5.0}; keys must be token ids below the vocabulary size."""
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})",
                "logit_bias",
            )
        bias[token_id] = float(value)
    return bias


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise APIError(
                400, f"token id {t} is outside the vocabulary [0, {vocab_size})", param=param
            )

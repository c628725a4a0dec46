"""Request schemas for structured output and tools (pydantic v2): `response_format`,
vLLM's `structured_outputs`, OpenAI `tools` / `tool_choice`, and the tool calls an
assistant message carries back. Shapes follow the official OpenAI schemas
(`ResponseFormatJsonSchema`, `ChatCompletionTool`, `ChatCompletionNamedToolChoice`,
`ChatCompletionMessageToolCall`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's rule for function and response-format names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: {"name", "schema", "strict", "description"}."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)  # a-z, A-Z, 0-9, _ and -, at most 64
    description: str | None = None  # what the format is for (not used for decoding)
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None = any JSON object
    strict: bool | None = None  # accepted; the schema is always enforced exactly


class ResponseFormat(BaseModel):
    """`response_format`: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None  # required with type json_schema


class StructuredOutputsOptions(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one of its keys per request."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is exactly one of these
    grammar: str | None = None  # Lark (llguidance dialect) or GBNF/EBNF
    json_object: bool | None = None  # true: any JSON object


class FunctionDef(BaseModel):
    """`tools[i].function`."""

    model_config = ConfigDict(extra="allow")

    name: str  # checked against NAME_PATTERN by the server (a 400 naming the tool)
    description: str | None = None  # shown to the model in the tools section
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments (an object)
    strict: bool | None = None  # accepted; forced calls always follow the schema


class ToolDef(BaseModel):
    """`tools[i]`: a function the model may call."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(BaseModel):
    """A call an earlier assistant turn made; `arguments` is JSON text of an object."""

    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object as text") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object as text")
        return value


class ToolCallIn(BaseModel):
    """`messages[i].tool_calls[j]` of an assistant message sent back by the client."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def template_dict(self) -> dict[str, Any]:
        """As chat templates expect it: arguments as a dict (HF convention)."""
        f = self.function
        function = {"name": f.name, "arguments": json.loads(f.arguments)}
        return {"id": self.id, "type": "function", "function": function}

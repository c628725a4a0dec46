"""Grammars that force tool calls (`tool_choice: "required"` or a named function), in
the format the server's tool-call parser reads back.

Each call's JSON is constrained by a schema built from the tool's parameters:

    {"type": "object", "properties": {"name": {"const": "get_weather"},
                                      "arguments": <the tool's parameters schema>},
     "required": ["name", "arguments"], "additionalProperties": false}

hermes, two tools, parallel calls allowed (llguidance Lark; `%json` embeds a schema):

    start: call ("\\n" call)*
    call: "<tool_call>\\n" call_json "\\n</tool_call>"
    call_json: %json {"anyOf": [<schema of get_weather>, <schema of get_time>]}

json: `start: %json <schema>` for one call, or an array of them (minItems 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tandem.engine.plan import StructuredOutput

# No free whitespace (a small model cannot wander into endless spaces), and separators
# as the chat template writes calls (`{"name": "f", "arguments": {...}}`).
JSON_STYLE = {
    "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON schema of one call of function `name`."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or ANY_OBJECT},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_schema(functions: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """One call of any of `functions` ((name, parameters) pairs)."""
    schemas = [call_schema(name, params) for name, params in functions]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def hermes_grammar(schema: dict[str, Any], parallel: bool) -> str:
    lines = [
        'start: call ("\\n" call)*' if parallel else "start: call",
        'call: "<tool_call>\\n" call_json "\\n</tool_call>"',
        "call_json: %json " + json.dumps(schema | JSON_STYLE),
    ]
    return "\n".join(lines) + "\n"


def json_grammar(schema: dict[str, Any], parallel: bool) -> str:
    if parallel:
        schema = {"type": "array", "items": schema, "minItems": 1}
    return "start: %json " + json.dumps(schema | JSON_STYLE) + "\n"


FORCED_GRAMMARS: dict[str, Callable[[dict[str, Any], bool], str]] = {
    "hermes": hermes_grammar,
    "json": json_grammar,
}


def forced_tool_calls(
    parser: str, functions: list[tuple[str, dict[str, Any] | None]], parallel: bool
) -> StructuredOutput:
    """The constraint that makes the output one call (or, with `parallel`, one or more
    calls) of `functions`, written the way tool-call parser `parser` reads it."""
    grammar = FORCED_GRAMMARS[parser](calls_schema(functions), parallel)
    return StructuredOutput("grammar", grammar)

"""How a chat request uses tools: validation of `tools` / `tool_choice`, what the chat
template renders, which parser reads the output, and the grammar of forced calls.

    tool_choice   tools rendered   output parsed   output forced by a grammar
    "none"        no               no              no
    "auto"        yes              yes             no (free text, parsed afterwards)
    "required"    yes              yes             one or more calls of any tool
    {"function"}  yes              yes             calls of that tool

`parallel_tool_calls: false` forces exactly one call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tandem.engine.plan import StructuredOutput
from tandem.server.errors import bad_request
from tandem.server.protocol import ChatCompletionRequest
from tandem.server.protocol_structured import NAME_PATTERN, NamedToolChoice
from tandem.server.structured_request import Constraint, StructuredChecker
from tandem.server.tool_grammar import forced_tool_calls

_NAME = re.compile(NAME_PATTERN)


@dataclass(slots=True)
class ToolPlan:
    """One chat request's use of tools (see the module doc)."""

    rendered: list[dict[str, Any]] | None = None  # `tools=` for the chat template
    parser: str | None = None  # tool-call parser name for the output; None = content only
    names: frozenset[str] = frozenset()  # functions the parser accepts as calls
    forced: list[Constraint] = field(default_factory=list)  # the grammar forcing calls


def plan_tools(req: ChatCompletionRequest, parser: str, checker: StructuredChecker) -> ToolPlan:
    """Validate the request's tools and tool_choice (400s naming the field) and plan
    their use with tool-call parser `parser` ("hermes" | "json")."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice needs `tools`", param="tool_choice")
        return ToolPlan()
    functions = _check_functions(req, checker)
    if choice == "none":
        return ToolPlan()
    plan = ToolPlan(
        rendered=[t.model_dump(exclude_none=True) for t in tools],
        parser=parser,
        names=frozenset(functions),
    )
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in functions:
            raise bad_request(
                f"tool_choice names function {name!r}, which is not in tools "
                f"({', '.join(functions)})",
                param="tool_choice",
            )
        forced = forced_tool_calls(parser, [(name, functions[name])], req.parallel_tool_calls)
        plan.forced = [("tool_choice", forced)]
    elif choice == "required":
        forced = forced_tool_calls(parser, list(functions.items()), req.parallel_tool_calls)
        plan.forced = [("tool_choice", forced)]
    return plan


def _check_functions(
    req: ChatCompletionRequest, checker: StructuredChecker
) -> dict[str, dict[str, Any] | None]:
    """name -> parameters schema, in order; bad names, duplicates and parameters that
    are not a compilable object schema are 400s naming `tools.i.function.*`."""
    functions: dict[str, dict[str, Any] | None] = {}
    for i, tool in enumerate(req.tools or []):
        f = tool.function
        where = f"tools.{i}.function"
        if not _NAME.match(f.name):
            raise bad_request(
                f"{where}.name: {f.name!r} must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                param=f"{where}.name",
            )
        if f.name in functions:
            raise bad_request(f"{where}.name: duplicate function {f.name!r}", f"{where}.name")
        params = f.parameters
        if params is not None:
            if params.get("type", "object") != "object":
                raise bad_request(
                    f"{where}.parameters: must be a JSON schema of type object, "
                    f"got type {params.get('type')!r}",
                    param=f"{where}.parameters",
                )
            schema = StructuredOutput("json_schema", json.dumps(params, ensure_ascii=False))
            checker.check(schema, f"{where}.parameters")
        functions[f.name] = params
    return functions

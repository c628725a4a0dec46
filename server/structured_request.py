"""A request's structured-output fields -> one `StructuredOutput` for the engine,
checked once per distinct constraint.

The forms, all mapped to `SamplingParams.structured` (at most one per request):

    response_format {"type": "json_object"}                 -> json_object
    response_format {"type": "json_schema", "json_schema": {"name", "schema"}}
                                                           -> json_schema
    structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_json | guided_regex | guided_choice | guided_grammar (older vLLM names)

A constraint that does not compile is a 400 `invalid_request_error` whose `param` is
the field that carried it and whose message is the compiler's (`check_structured`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from tandem.engine.plan import StructuredOutput
from tandem.engine.structured import check_structured
from tandem.server.errors import bad_request
from tandem.server.protocol import SamplingFields

# A constraint named with the request field that carried it ("structured_outputs.regex").
Constraint = tuple[str, StructuredOutput]


class StructuredChecker:
    """Checks constraints with the engine's compiler, remembering the verdict of the
    last `max_entries` distinct ones (one per server: compiling a large schema costs
    milliseconds, and clients send the same schema over and over)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._verdicts: OrderedDict[StructuredOutput, str | None] = OrderedDict()
        self.num_compiled = 0  # constraints actually compiled (cache misses)

    def check(self, so: StructuredOutput, param: str) -> None:
        """Raise a 400 naming `param` and the problem if `so` does not compile."""
        error = self._verdict(so)
        if error is not None:
            raise bad_request(f"{param}: {error}", param=param)

    def _verdict(self, so: StructuredOutput) -> str | None:
        if so in self._verdicts:
            self._verdicts.move_to_end(so)
            return self._verdicts[so]
        self.num_compiled += 1
        try:
            check_structured(so)
            error = None
        except ValueError as exc:
            error = str(exc)
        self._verdicts[so] = error
        if len(self._verdicts) > self.max_entries:
            self._verdicts.popitem(last=False)
        return error


def request_constraints(req: SamplingFields) -> list[Constraint]:
    """Every constraint the request asks for, each with its field name (unchecked).
    Raises a 400 for a form that is malformed before compiling (a schema that is not
    JSON, json_schema without its `json_schema` object)."""
    found: list[Constraint] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", StructuredOutput("json_object", "")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request(
                "response_format of type json_schema needs a `json_schema` object",
                param="response_format.json_schema",
            )
        schema = fmt.json_schema.schema_
        param = "response_format.json_schema.schema"
        so = StructuredOutput("json_object", "") if schema is None else _schema(schema, param)
        found.append((param, so))
    opts = req.structured_outputs
    if opts is not None:
        if opts.json_ is not None:
            found.append(
                ("structured_outputs.json", _schema(opts.json_, "structured_outputs.json"))
            )
        found += _plain("structured_outputs", opts.regex, opts.choice, opts.grammar)
        if opts.json_object:
            found.append(("structured_outputs.json_object", StructuredOutput("json_object", "")))
    if req.guided_json is not None:
        found.append(("guided_json", _schema(req.guided_json, "guided_json")))
    found += _plain("guided", req.guided_regex, req.guided_choice, req.guided_grammar)
    return found


def structured_output(
    req: SamplingFields, checker: StructuredChecker, extra: Sequence[Constraint] = ()
) -> StructuredOutput | None:
    """The request's one constraint, checked (None = free text). `extra`: constraints
    from elsewhere (a forced tool call). Several constraints -> 400 naming them."""
    found = request_constraints(req) + list(extra)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise bad_request(
            f"at most one structured output constraint per request; got {names}",
            param=found[1][0],
        )
    param, so = found[0]
    checker.check(so, param)
    return so


def _schema(schema: dict[str, Any] | str, param: str) -> StructuredOutput:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as exc:
            raise bad_request(f"{param}: the schema is not valid JSON: {exc}", param) from None
        return StructuredOutput("json_schema", schema)
    return StructuredOutput("json_schema", json.dumps(schema, ensure_ascii=False))


def _plain(
    prefix: str, regex: str | None, choice: list[str] | None, grammar: str | None
) -> list[Constraint]:
    """regex / choice / grammar under `prefix.name` (structured_outputs) or
    `prefix_name` (guided_*)."""
    sep = "." if prefix == "structured_outputs" else "_"
    found: list[Constraint] = []
    if regex is not None:
        found.append((f"{prefix}{sep}regex", StructuredOutput("regex", regex)))
    if choice is not None:
        found.append((f"{prefix}{sep}choice", StructuredOutput("choice", json.dumps(choice))))
    if grammar is not None:
        found.append((f"{prefix}{sep}grammar", StructuredOutput("grammar", grammar)))
    return found

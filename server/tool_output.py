"""A chat choice's output with tools: the OpenAI `message` (content and `tool_calls`)
when not streamed, and `delta`s with tool-call chunks when streamed.

Both run the same incremental parser, so the streamed deltas of a choice add up to its
non-streamed message. A streamed call arrives whole, in one chunk, once its
`</tool_call>` (or the end of a JSON output) is seen:

    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function",
                     "function": {"name": "f", "arguments": "{\\"x\\": 1}"}}]}
"""

from __future__ import annotations

from typing import Any

from tandem.server.tool_parsers import ToolDelta, make_parser, parse_all
from tandem.server.tools import ToolPlan


def final_message(text: str, plan: ToolPlan) -> tuple[dict[str, Any], bool]:
    """(the non-streamed `message`, whether it holds tool calls). With calls and no
    other text, `content` is null."""
    msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if plan.parser is None:
        return msg, False
    parsed = parse_all(make_parser(plan.parser, plan.names), text)
    if not parsed.calls:
        return msg, False
    msg["content"] = parsed.content or None
    msg["tool_calls"] = [c.openai() for c in parsed.calls]
    return msg, True


def tool_finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """ "tool_calls" when the model stopped after calling tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason


class ToolStream:
    """One streamed choice: text deltas in, `delta` bodies (content, tool_calls) out."""

    def __init__(self, plan: ToolPlan) -> None:
        assert plan.parser is not None, "a tool stream needs a parser"
        self.parser = make_parser(plan.parser, plan.names)
        self.num_calls = 0  # calls sent so far: the next call's index

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """What `text` adds; `final`: the choice's last text (flushes held text)."""
        d = self.parser.push(text)
        if final:
            d.extend(self.parser.finish())
        return self._body(d)

    def _body(self, d: ToolDelta) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if d.content:
            body["content"] = d.content
        if d.calls:
            body["tool_calls"] = [
                {"index": self.num_calls + i} | c.openai() for i, c in enumerate(d.calls)
            ]
            self.num_calls += len(d.calls)
        return body

"""Tool calls from model output text: `--tool-call-parser hermes | json`.

A parser is incremental: `push(text)` takes each streamed text delta and returns the
content it can release and the calls it has completed; `finish()` ends the output.
The non-streamed answer is the same parser fed the whole text at once (`parse_all`),
so streamed deltas always concatenate to the non-streamed message, however the text
was split.

hermes: calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or
more, anywhere in the text; the text around them is content (whitespace next to a call
dropped). A block that does not parse (bad JSON, unknown function) stays content.

    push('Sure.<tool_c')  -> content 'Sure.'   (a possible tag start is held back)
    push('all>{"name": "f", "arguments": {"x": 1}}</tool_call>')
                          -> calls [f({"x": 1})]

json: the whole output is `{"name": ..., "arguments": ...}` or a list of them;
anything else is content. A list cut short (max_tokens) keeps its complete calls; the
cut rest is content.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

CALL_ID_ALPHABET = string.ascii_letters + string.digits
OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    """`call_` + 24 random alphanumerics (the OpenAI form)."""
    return "call_" + "".join(secrets.choice(CALL_ID_ALPHABET) for _ in range(24))


@dataclass(slots=True)
class ToolCall:
    """One function call the model made."""

    name: str  # a function from the request's tools
    arguments: str  # its arguments, JSON text of an object
    id: str = field(default_factory=new_call_id)  # call_ + 24 alphanumerics

    def openai(self) -> dict[str, Any]:
        """`ChatCompletionMessageToolCall`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class ToolDelta:
    """What one piece of output text adds to a message."""

    content: str = ""  # content text released now
    calls: list[ToolCall] = field(default_factory=list)  # calls completed now, in order

    def extend(self, other: ToolDelta) -> ToolDelta:
        self.content += other.content
        self.calls.extend(other.calls)
        return self


class ToolParser(Protocol):
    """Incremental tool-call parser over one choice's output text."""

    def push(self, text: str) -> ToolDelta: ...

    def finish(self) -> ToolDelta: ...


def call_from_json(obj: Any, names: frozenset[str]) -> ToolCall | None:
    """{"name": "f", "arguments": {...}} -> ToolCall; None unless `name` is a known
    function and the arguments an object (or JSON text of one; `parameters` also)."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class HermesParser:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the text (see the module doc)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names  # functions the request offered
        self.buf = ""  # text not yet decided (a partial tag, or a call body)
        self.in_call = False  # buf is the body of an open <tool_call>
        self.held_ws = ""  # trailing whitespace of the content, held back
        self.ws_before_call = ""  # held whitespace dropped by an open call
        self.after_call = False  # the last thing released was a call
        self.num_calls = 0

    def push(self, text: str) -> ToolDelta:
        self.buf += text
        out = ToolDelta()
        while True:
            if self.in_call:
                end = self.buf.find(CLOSE_TAG)
                if end < 0:
                    return out
                body, self.buf = self.buf[:end], self.buf[end + len(CLOSE_TAG) :]
                self.in_call = False
                self._close(body, OPEN_TAG + body + CLOSE_TAG, out)
                continue
            start = self.buf.find(OPEN_TAG)
            if start < 0:
                cut = len(self.buf) - _partial_tag_len(self.buf, OPEN_TAG)
                self._content(self.buf[:cut], out)
                self.buf = self.buf[cut:]
                return out
            self._content(self.buf[:start], out)
            self.ws_before_call, self.held_ws = self.held_ws, ""
            self.buf = self.buf[start + len(OPEN_TAG) :]
            self.in_call = True

    def finish(self) -> ToolDelta:
        out = ToolDelta()
        if self.in_call:  # unterminated (cut by max_tokens): a call if its JSON is whole
            self._close(self.buf, OPEN_TAG + self.buf, out)
        else:
            self._content(self.buf, out)
        if self.num_calls == 0:
            out.content += self.held_ws  # no calls: the content is the text, exactly
        self.buf, self.held_ws, self.in_call = "", "", False
        return out

    def _close(self, body: str, raw: str, out: ToolDelta) -> None:
        try:
            call = call_from_json(json.loads(body), self.names)
        except ValueError:
            call = None
        if call is None:
            self._content(self.ws_before_call + raw, out)
        else:
            out.calls.append(call)
            self.num_calls += 1
            self.after_call = True
        self.ws_before_call = ""

    def _content(self, text: str, out: ToolDelta) -> None:
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            self.after_call = False
        text = self.held_ws + text
        kept = text.rstrip()
        self.held_ws = text[len(kept) :]
        out.content += kept


class JsonParser:
    """The whole output is one call object or a list of them (see the module doc)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names  # functions the request offered
        self.buf = ""  # the output so far, while it may be JSON
        self.is_json: bool | None = None  # None until the first non-space character

    def push(self, text: str) -> ToolDelta:
        if self.is_json is False:
            return ToolDelta(text)
        self.buf += text
        head = self.buf.lstrip()
        if self.is_json is None and head:
            self.is_json = head[0] in "{["
            if not self.is_json:
                text, self.buf = self.buf, ""
                return ToolDelta(text)
        return ToolDelta()

    def finish(self) -> ToolDelta:
        text, self.buf = self.buf, ""
        if not self.is_json:
            return ToolDelta(text)
        try:
            obj = json.loads(text)
        except ValueError:
            return self._cut_list(text)
        items = obj if isinstance(obj, list) else [obj]
        calls = [call_from_json(o, self.names) for o in items]
        if not calls or any(c is None for c in calls):
            return ToolDelta(text)
        return ToolDelta("", calls)  # type: ignore[arg-type]

    def _cut_list(self, text: str) -> ToolDelta:
        """`[call, call, {"na` -> the complete calls, and the rest as content."""
        s = text.lstrip()
        if not s.startswith("["):
            return ToolDelta(text)
        decoder, pos, calls = json.JSONDecoder(), 1, []
        while True:
            pos = len(s) - len(s[pos:].lstrip())
            try:
                obj, pos = decoder.raw_decode(s, pos)
            except ValueError:
                break
            call = call_from_json(obj, self.names)
            if call is None:
                return ToolDelta(text)
            calls.append(call)
            rest = s[pos:].lstrip()
            if not rest.startswith(","):
                break
            pos = len(s) - len(rest) + 1
        return ToolDelta(s[pos:].lstrip(), calls) if calls else ToolDelta(text)


TOOL_PARSERS: dict[str, type[HermesParser] | type[JsonParser]] = {
    "hermes": HermesParser,
    "json": JsonParser,
}


def make_parser(name: str, names: frozenset[str]) -> ToolParser:
    """A fresh parser for one choice; `names` are the functions the request offered."""
    try:
        return TOOL_PARSERS[name](names)
    except KeyError:
        known = ", ".join(TOOL_PARSERS)
        raise ValueError(f"unknown tool call parser {name!r}; known: {known}") from None


def parse_all(parser: ToolParser, text: str) -> ToolDelta:
    """The whole output at once: (content, calls), as the streamed deltas add up."""
    return parser.push(text).extend(parser.finish())

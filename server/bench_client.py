"""A light HTTP/1.1 + SSE client on raw asyncio streams, and one timed benchmark request.

No HTTP library: one connection per request over loopback costs little, and the client
must leave the CPU to the server it measures. Handles chunked and Content-Length
bodies; server-sent events are split by `SSEParser`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tandem.server.bench_workload import BenchRequest


class SSEParser:
    """Splits a byte stream into the `data:` payloads of complete events.

        p = SSEParser()
        p.feed(b'data: {"a": 1}\\n\\nda')  # -> ['{"a": 1}']
        p.feed(b'ta: [DONE]\\n\\n')         # -> ['[DONE]']

    Lines may end in \\n or \\r\\n; several `data:` lines of one event are joined with
    \\n; comments (`:`) and other fields are skipped.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if not sep:
                return events
            self._buf = rest
            text = line.rstrip(b"\r").decode("utf-8", errors="replace")
            if text == "":
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif text.startswith("data:"):
                self._data.append(text[5:].removeprefix(" "))


@dataclass(slots=True)
class HttpResponse:
    """The head of a response and an iterator over its body bytes."""

    status: int  # HTTP status code
    headers: dict[str, str]  # lower-cased names
    body: AsyncIterator[bytes]  # decoded from chunked transfer encoding when used
    writer: asyncio.StreamWriter  # closed by `close()`

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.body])

    def close(self) -> None:
        self.writer.close()


async def http_request(
    url: str, method: str, path: str, payload: object | None, headers: dict[str, str]
) -> HttpResponse:
    """Send one request on a new connection (`Connection: close`); returns at the head."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    body = b"" if payload is None else json.dumps(payload).encode()
    base = (parts.path or "").rstrip("/")
    head = [f"{method} {base}{path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if payload is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    fields = status_line.split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        writer.close()
        raise ConnectionError(f"bad HTTP status line {status_line[:80]!r}")
    resp_headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        resp_headers[name.strip().lower()] = value.strip()
    return HttpResponse(int(fields[1]), resp_headers, _body(reader, resp_headers), writer)


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield await reader.readexactly(size)
            await reader.readline()  # the CRLF after each chunk
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


@dataclass(slots=True)
class RequestResult:
    """How one benchmark request went. Times in seconds."""

    index: int  # BenchRequest.index
    status: int  # HTTP status; 0 = no response (connection error or timeout)
    error: str = ""  # error message when the request failed, else ""
    start_s: float = 0.0  # send time, after the benchmark start
    ttft_s: float | None = None  # send -> first content chunk
    e2e_s: float | None = None  # send -> end of stream
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    num_chunks: int = 0  # streamed chunks with non-empty text
    prompt_tokens: int | None = None  # from the server's usage; None = not reported
    completion_tokens: int | None = None  # from the server's usage; None = not reported

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def request_body(req: BenchRequest, model: str, chat: bool, ignore_eos: bool) -> dict:
    """The JSON body: greedy, streaming, usage in the last chunk."""
    body: dict[str, object] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


async def send_request(
    url: str, path: str, body: dict, headers: dict[str, str], t0: float, index: int
) -> RequestResult:
    """Send one streaming request and time it; never raises (failures are results)."""
    res = RequestResult(index, 0, start_s=time.perf_counter() - t0)
    start = time.perf_counter()
    try:
        resp = await http_request(url, "POST", path, body, headers)
    except (OSError, asyncio.IncompleteReadError, ConnectionError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.status = resp.status
    try:
        if resp.status != 200:
            res.error = _error_message(await resp.read())
        else:
            await _consume_stream(resp, res, start)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        resp.close()
    return res


async def _consume_stream(resp: HttpResponse, res: RequestResult, start: float) -> None:
    parser, last = SSEParser(), None
    async for piece in resp.body:
        now = time.perf_counter()
        for data in parser.feed(piece):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = _error_message(data.encode())
            if chunk.get("usage"):
                res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                res.completion_tokens = chunk["usage"].get("completion_tokens")
            if _chunk_text(chunk):
                res.num_chunks += 1
                if last is None:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
    res.e2e_s = time.perf_counter() - start
    if res.num_chunks == 0 and not res.error:
        res.error = "no content streamed"


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


def _error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error", {})
        return str(err.get("message", err) if isinstance(err, dict) else err)[:200]
    except (ValueError, AttributeError):
        return raw[:200].decode("utf-8", errors="replace")

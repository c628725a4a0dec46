"""Logging for the server: text or JSON lines, and the per-request line.

    configure_logging("info", "json")   # root handler on stderr, one JSON object a line
    log_request(request_id, times, 12, 40, "length", 0)
    # {"ts": "2025-01-01T12:00:00.000+00:00", "level": "INFO", "logger": "tandem.request",
    #  "message": "request cmpl-1-0 finished: ...", "request_id": "cmpl-1-0",
    #  "finish_reason": "length", "prompt_tokens": 12, "generation_tokens": 40, ...}

Structured fields travel on a record as `extra={"fields": {...}}`: the JSON formatter
merges them into the object, the text formatter shows only the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from tandem.server.request_stats import RequestTimes

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REQUEST_LOGGER = "tandem.request"
_BASE_KEYS = ("ts", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC, ms), level, logger, message, the
    record's `fields` (never replacing those four), and `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out |= {k: v for k, v in fields.items() if k not in _BASE_KEYS}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Root logger at `level` (uvicorn's "trace" = DEBUG) on stderr, as `fmt` ("text" or
    "json"). With json, run uvicorn with `log_config=None` so its records reach this
    handler too."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be text or json; got {fmt!r}")
    numeric = "DEBUG" if level == "trace" else level.upper()
    logging.basicConfig(level=numeric, handlers=[handler], force=True)


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def log_request(
    request_id: str,
    times: RequestTimes,
    num_prompt_tokens: int,
    num_output_tokens: int,
    finish_reason: str,
    num_cached_tokens: int,
) -> None:
    """One INFO line for an engine request that ended (finished or aborted)."""
    fields = {
        "request_id": request_id,
        "finish_reason": finish_reason,
        "prompt_tokens": num_prompt_tokens,
        "generation_tokens": num_output_tokens,
        "cached_tokens": num_cached_tokens,
        "ttft_s": _seconds(times.ttft),
        "e2e_s": _seconds(times.e2e),
        "queue_s": _seconds(times.queue_time),
    }
    shown = " ".join(
        f"{k}={_fmt(v)}" for k, v in fields.items() if k != "request_id" and v is not None
    )
    logging.getLogger(REQUEST_LOGGER).info(
        "request %s finished: %s", request_id, shown, extra={"fields": fields}
    )


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)

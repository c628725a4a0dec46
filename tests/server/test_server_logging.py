"""Logging: JSON lines, the per-request line, the periodic engine statistics line, and
the flags that control them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scheduler"))
from scheduler_fakes import greedy, make_core, run_to_end  # noqa: E402

from tandem.scheduler.loop import EngineLoop  # noqa: E402
from tandem.scheduler.request import GenerateRequest  # noqa: E402
from tandem.server.cli import parse_configs  # noqa: E402
from tandem.server.flags import ConfigError  # noqa: E402
from tandem.server.logs import REQUEST_LOGGER, JsonFormatter, log_request  # noqa: E402
from tandem.server.metrics import ServerMetrics  # noqa: E402
from tandem.server.request_stats import RequestTimes  # noqa: E402
from tandem.server.stats_logger import StatsReporter  # noqa: E402


def _record(msg: str, fields: dict | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("tandem.x", logging.INFO, __file__, 1, msg, (), exc_info)
    if fields is not None:
        record.fields = fields
    return record


def test_json_formatter_one_object_per_line_with_fields():
    line = JsonFormatter().format(_record("hello %s", {"a": 1, "message": "not me"}))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "hello %s" and obj["a"] == 1
    assert obj["level"] == "INFO" and obj["logger"] == "tandem.x"
    assert obj["ts"].endswith("+00:00")
    failed = json.loads(JsonFormatter().format(_record("x", exc=True)))
    assert "RuntimeError: boom" in failed["exception"]


def test_request_line_has_id_tokens_latencies_and_reason(caplog):
    times = RequestTimes(arrival=10.0, first_scheduled=10.1, first_token=10.25, finished=11.0)
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        log_request("cmpl-1-0", times, 12, 40, "length", 8)
    (record,) = caplog.records
    text = record.getMessage()
    assert text.startswith("request cmpl-1-0 finished:")
    for part in ("finish_reason=length", "prompt_tokens=12", "generation_tokens=40"):
        assert part in text
    assert "ttft_s=0.250" in text and "e2e_s=1.000" in text
    assert record.fields["ttft_s"] == pytest.approx(0.25)
    assert json.loads(JsonFormatter().format(record))["request_id"] == "cmpl-1-0"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stats_line_every_interval_while_busy(caplog):
    core, _ = make_core(max_num_batched_tokens=16)
    metrics = ServerMetrics("m")
    metrics.attach(EngineLoop(core))
    clock = _Clock()
    reporter = StatsReporter(metrics, log_interval=5.0, clock=clock)
    assert reporter.tick() is None  # the first tick only marks
    run_to_end(core, [GenerateRequest("a", [1, 2, 3, 4], greedy(10))])
    clock.now = 2.0
    assert reporter.tick() is None  # not due yet
    clock.now = 5.0
    with caplog.at_level(logging.INFO, logger="tandem.stats"):
        fields = reporter.tick()
    assert fields is not None
    assert fields["generation_tokens_per_s"] == pytest.approx(10 / 5.0)
    assert fields["prompt_tokens_per_s"] == pytest.approx(4 / 5.0)
    assert fields["draft_acceptance_rate"] is None  # no speculation
    (record,) = caplog.records
    assert "generation 2.0 tok/s" in record.getMessage()
    assert "draft acceptance n/a" in record.getMessage()
    clock.now = 11.0
    assert reporter.tick() is None  # idle since: no line


def test_stats_reporter_without_engine_or_logging():
    assert StatsReporter(ServerMetrics("m"), 1.0).tick() is None  # engine not loaded
    core, _ = make_core()
    metrics = ServerMetrics("m")
    metrics.attach(EngineLoop(core))
    assert StatsReporter(metrics, None).tick() is None  # --disable-log-stats


def test_logging_flags():
    server, _, _ = parse_configs(["--log-format", "json", "--disable-log-requests"])
    assert server.log_format == "json" and server.disable_log_requests
    assert not server.disable_log_stats and server.log_stats_interval == 5.0
    server, _, _ = parse_configs(["--disable-log-stats", "--log-stats-interval", "2"])
    assert server.disable_log_stats and server.log_stats_interval == 2.0
    with pytest.raises(ConfigError, match="--log-format"):
        parse_configs(["--log-format", "xml"])
    with pytest.raises(ConfigError, match="--log-stats-interval"):
        parse_configs(["--log-stats-interval", "0"])

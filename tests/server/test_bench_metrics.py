"""The benchmark's maths: percentiles, TPOT, goodput, error counts, usage cross-check."""

from __future__ import annotations

import json

import pytest

from tandem.server.bench_client import RequestResult
from tandem.server.bench_metrics import (
    Goodput,
    format_report,
    is_good,
    parse_goodput,
    stats_ms,
    summarize,
    tpot_s,
)


def ok(index, ttft, e2e, tokens, chunks=None, itl=()):
    return RequestResult(
        index,
        200,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=list(itl),
        num_chunks=tokens if chunks is None else chunks,
        prompt_tokens=10,
        completion_tokens=tokens,
    )


def test_stats_ms_percentiles_linear():
    s = stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p95"] == pytest.approx(95.05)
    assert s["p99"] == pytest.approx(99.01)
    assert stats_ms([]) == {"mean": None, "median": None, "p95": None, "p99": None}


def test_tpot_excludes_the_first_token():
    assert tpot_s(ok(0, 0.2, 1.2, 11)) == pytest.approx(0.1)
    assert tpot_s(ok(0, 0.2, 0.2, 1)) is None
    no_usage = ok(0, 0.1, 0.5, 0, chunks=5)
    no_usage.completion_tokens = None
    assert tpot_s(no_usage) == pytest.approx(0.1)  # falls back to streamed chunks


def test_goodput_needs_both_targets():
    target = Goodput(ttft_ms=300, tpot_ms=50)
    assert is_good(ok(0, 0.25, 0.25 + 10 * 0.04, 11), target)
    assert not is_good(ok(0, 0.35, 0.35 + 10 * 0.04, 11), target)  # TTFT miss
    assert not is_good(ok(0, 0.25, 0.25 + 10 * 0.06, 11), target)  # TPOT miss
    assert is_good(ok(0, 0.25, 0.25, 1), target)  # one token: TPOT vacuous
    assert not is_good(RequestResult(0, 429, error="busy"), target)


def test_parse_goodput():
    assert parse_goodput(["tpot:50", "ttft:500"]) == Goodput(500, 50)
    for bad in (["ttft:500"], ["ttft:0", "tpot:5"], ["ttft:a", "tpot:5"], ["e2e:5", "tpot:5"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_summary_counts_throughput_errors_and_mismatches():
    results = [
        ok(0, 0.1, 1.1, 11, itl=[0.1] * 10),
        ok(1, 0.3, 2.3, 21, itl=[0.1] * 20),
        ok(2, 0.2, 1.2, 6, chunks=5, itl=[0.2] * 4),  # usage says 6, streamed 5
        RequestResult(3, 429, error="too many requests"),
        RequestResult(4, 429, error="too many requests"),
        RequestResult(5, 0, error="ConnectionRefusedError"),
    ]
    s = summarize(results, duration_s=4.0, goodput=Goodput(250, 150))
    assert (s["completed"], s["failed"]) == (3, 3)
    assert s["errors_by_status"] == {"0": 1, "429": 2}
    assert s["total_output_tokens"] == 38
    assert s["output_throughput"] == pytest.approx(38 / 4)
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["itl_ms"]["mean"] == pytest.approx((3.0 + 0.8) / 34 * 1000)
    assert s["usage_chunk_mismatches"] == 1
    assert s["usage_chunk_mismatch_indices"] == [2]
    assert s["tokens_per_chunk"] == pytest.approx(38 / 37)
    # good: #0 (ttft 100, tpot 100) and #2 (ttft 200, tpot 200 > 150: no) -> only #0
    assert s["goodput"]["fraction"] == pytest.approx(1 / 6)
    assert s["goodput"]["rate"] == pytest.approx(1 / 4)
    json.dumps(s)  # JSON-ready
    text = format_report(s)
    assert "429" in text and "goodput" in text and "mismatches" in text


def test_summary_of_all_failed_has_no_latencies():
    s = summarize([RequestResult(0, 503, error="draining")], 1.0, None)
    assert s["completed"] == 0 and s["ttft_ms"]["p99"] is None and "goodput" not in s
    assert "n/a" in format_report(s)

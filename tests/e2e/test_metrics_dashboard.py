"""A live `tandem serve`: every series the Grafana dashboard and the alert rules read is
exported with the model_name label (before any request, and after traffic), the
request and engine families count what was served, and --log-format json writes one
JSON object per line with a line per request."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai_server_harness import MODEL_NAME, TandemServer, require_builtin_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from promql_refs import exported_series, referenced_metrics  # noqa: E402

COMPLETION = {"model": MODEL_NAME, "prompt": "ROMEO:", "max_tokens": 8, "ignore_eos": True}
CHAT = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "Who art thou?"}],
    "max_tokens": 6,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def server():
    require_builtin_model()
    # info level for the request and stats lines; a short stats interval to see one
    args = ["--log-format", "json", "--log-level", "info", "--log-stats-interval", "1"]
    with TandemServer(args) as srv:
        yield srv


def _scrape(server: TandemServer) -> dict[str, list[dict[str, str]]]:
    r = httpx.get(server.base_url + "/metrics", timeout=10)
    assert r.status_code == 200
    return exported_series(r.text)


def _value(server: TandemServer, name: str, **labels: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def _missing(series: dict[str, list[dict[str, str]]]) -> list[str]:
    return sorted(referenced_metrics() - set(series))


def test_dashboard_and_alert_series_exist_before_any_request(server):
    # only the HTTP counter waits for its first answered request (its labels are the
    # route and status); the scrape above this one is such a request
    series = _scrape(server)
    assert _missing(series) in ([], ["tandem:http_requests_total"])
    for name, label_sets in series.items():
        assert all(labels.get("model_name") == MODEL_NAME for labels in label_sets), name


def test_dashboard_and_alert_series_exist_after_traffic(server):
    with server.http() as http:
        assert http.post("/v1/completions", json=COMPLETION | {"n": 2}).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as r:
            assert r.status_code == 200
            assert list(r.iter_lines())
    series = _scrape(server)
    assert _missing(series) == []
    assert _value(server, "tandem:request_success_total", finished_reason="length") >= 3
    assert _value(server, "tandem:generation_tokens_total") >= 2 * 8 + 6
    assert _value(server, "tandem:time_to_first_token_seconds_count") >= 3
    assert _value(server, "tandem:inter_token_latency_seconds_count") >= 2 * 7 + 5
    assert _value(server, "tandem:request_queue_time_seconds_count") >= 3
    assert _value(server, "tandem:engine_steps_total") >= 8
    assert _value(server, "tandem:step_tokens_total", kind="decode") >= 7
    assert _value(server, "tandem:iteration_tokens_count") >= 8
    assert _value(server, "tandem:engine_healthy") == 1
    assert _value(server, "tandem:kv_cache_num_blocks") > 0
    assert _value(server, "tandem:step_stats_dropped_total") == 0


def test_json_logs_have_request_and_stats_lines(server):
    with server.http() as http:
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    deadline = time.monotonic() + 20
    next_request = time.monotonic() + 2
    while time.monotonic() < deadline:
        if time.monotonic() > next_request:  # a stats line needs steps inside an interval
            with server.http() as http:  # that the reporter has seen start (busy machines)
                http.post("/v1/completions", json=COMPLETION)
            next_request += 2
        lines = Path(server.log_path).read_text(errors="replace").splitlines()
        records = [json.loads(ln) for ln in lines if ln.startswith("{")]
        requests = [r for r in records if r["logger"] == "tandem.request"]
        stats = [r for r in records if r["logger"] == "tandem.stats"]
        if requests and stats:
            break
        time.sleep(0.2)
    # every line the server wrote is a JSON object (uvicorn's own lines included)
    assert all(ln.startswith("{") for ln in lines if ln.strip()), lines[:5]
    assert requests and stats, lines[-10:]
    r = requests[-1]
    assert r["finish_reason"] == "length" and r["generation_tokens"] == 8
    assert r["prompt_tokens"] > 0 and r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"]
    assert stats[-1]["generation_tokens_per_s"] >= 0 and "kv_cache_usage" in stats[-1]

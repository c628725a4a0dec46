"""deploy/grafana/tandem.json: generated from dashboard.py, Grafana 10 shaped, one row per
concern, a model_name variable, and every query reading series Tandem exports (here
from an in-process ServerMetrics; tests/e2e checks a live server)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from promql_refs import (
    DASHBOARD,
    dashboard_exprs,
    exported_series,
    load_dashboard,
    metric_names,
    parse,
    referenced_metrics,
)

from tandem.server.metrics import ServerMetrics

ROWS = (
    "Latency",
    "Throughput",
    "Queue and batch",
    "KV cache and prefix cache",
    "Speculation",
    "Errors and 429s",
)


def _generator():
    path = Path(DASHBOARD).with_name("dashboard.py")
    spec = importlib.util.spec_from_file_location("tandem_dashboard", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_json_is_what_the_generator_writes():
    assert DASHBOARD.read_text() == _generator().render(), (
        "deploy/grafana/tandem.json is stale: run python deploy/grafana/dashboard.py"
    )


def test_rows_and_model_name_variable():
    d = load_dashboard()
    assert d["schemaVersion"] >= 36  # Grafana 10 reads 36+
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == list(ROWS)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["model_name"]["type"] == "query"
    assert "model_name" in variables["model_name"]["query"]["query"]
    assert variables["datasource"]["query"] == "prometheus"


def test_panels_are_placed_and_select_the_model():
    d = load_dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    for p in _panels(d):
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            assert 'model_name=~"$model_name"' in t["expr"], (p["title"], t["expr"])
            parse(t["expr"])  # valid PromQL once Grafana's variables are substituted


def test_latency_panels_show_p50_p95_p99():
    d = load_dashboard()
    by_title = {p["title"]: p for p in _panels(d)}
    for title in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        legends = [t["legendFormat"] for t in by_title[title]["targets"]]
        assert legends == ["p50", "p95", "p99"], title


def test_speculation_row_has_the_promised_panels():
    titles = {p["title"] for p in _panels(load_dashboard())}
    for title in (
        "Draft acceptance rate",
        "Mean accepted length",
        "Chosen k",
        "Goodput",
        "Is speculation helping?",
        "429 rejections",
    ):
        assert title in titles


def test_metric_names_come_from_the_parse_tree():
    expr = (
        'sum by (le) (rate(tandem:a_bucket{model_name=~"$model_name", le="0.0"}'
        "[$__rate_interval])) / ignoring(kind) group_left() sum(tandem:b) or up == 0"
    )
    assert metric_names(expr) == {"tandem:a_bucket", "tandem:b", "up"}
    with pytest.raises(ValueError):
        parse("sum(rate(tandem:a[5m])")


def test_every_queried_series_is_exported_from_start_up():
    """Before the engine loads and before any request, every series the dashboard and
    the alerts read exists, with the model_name label."""
    series = exported_series(ServerMetrics("m").render().decode())
    wanted = referenced_metrics()
    assert len(wanted) > 30
    missing = sorted(wanted - set(series))
    # tandem:http_requests_total has a sample once a request was answered
    assert missing == ["tandem:http_requests_total"], missing
    for name in wanted - {"tandem:http_requests_total"}:
        assert all(labels.get("model_name") == "m" for labels in series[name]), name


def test_dashboard_reads_each_family_it_promises():
    names = set().union(*(metric_names(e) for e in dashboard_exprs(load_dashboard())))
    for name in (
        "tandem:time_to_first_token_seconds_bucket",
        "tandem:inter_token_latency_seconds_bucket",
        "tandem:e2e_request_latency_seconds_bucket",
        "tandem:num_requests_waiting",
        "tandem:kv_cache_usage_perc",
        "tandem:prefix_cache_hits_total",
        "tandem:spec_decode_num_accepted_tokens_total",
        "tandem:spec_decode_chosen_k_bucket",
        "tandem:request_rejected_total",
        "tandem:step_tokens_total",
        "tandem:iteration_budget_usage_bucket",
    ):
        assert name in names, name

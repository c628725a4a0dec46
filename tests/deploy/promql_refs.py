"""The PromQL of the Grafana dashboard and the Prometheus alert rules, parsed, and the
metric names it reads. Shared by tests/deploy and tests/e2e (which adds this folder to
sys.path).

    exprs = dashboard_exprs(load_dashboard()) + alert_exprs(load_alerts())
    names = set().union(*(metric_names(e) for e in exprs))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "tandem.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
# Grafana's variables, replaced by values Prometheus accepts before parsing.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$model_name": ".*"}
# Series Prometheus makes itself, not exported by Tandem.
PROMETHEUS_SERIES = frozenset({"up"})


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_alerts() -> dict[str, Any]:
    return yaml.safe_load(ALERTS.read_text())


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's expr (rows' nested panels too) and the variable queries."""
    exprs = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]  # label_values(METRIC, label)
            metric = query.removeprefix("label_values(").split(",")[0].strip()
            exprs.append(metric)
    return exprs


def alert_exprs(rules: dict[str, Any]) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def parse(expr: str) -> promql_parser.Expr:
    """Parse after substituting Grafana variables; raises ValueError on bad PromQL."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return promql_parser.parse(expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects, e.g. {"tandem:x_bucket", "up"}."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(parse(expr), visit)
    return names


def referenced_metrics() -> set[str]:
    """Every Tandem series the dashboard and the alert rules read."""
    exprs = dashboard_exprs(load_dashboard()) + alert_exprs(load_alerts())
    return set().union(*(metric_names(e) for e in exprs)) - PROMETHEUS_SERIES


def exported_series(exposition: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from Prometheus text (HELP/TYPE lines skipped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out

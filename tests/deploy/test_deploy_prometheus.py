"""deploy/: the Prometheus scrape config, the alert rules and the compose stack."""

from __future__ import annotations

import json

import yaml
from promql_refs import ALERTS, REPO, alert_exprs, load_alerts, parse

DEPLOY = REPO / "deploy"
REQUIRED_ALERTS = {
    "TandemEngineDown": "tandem:engine_healthy",
    "TandemQueueGrowing": "tandem:num_requests_waiting",
    "TandemTTFTHigh": "tandem:time_to_first_token_seconds_bucket",
    "TandemKVCacheFull": "tandem:kv_cache_usage_perc",
}


def _yaml(path):
    return yaml.safe_load(path.read_text())


def test_alert_rules_are_complete_and_parse():
    rules = {r["alert"]: r for g in load_alerts()["groups"] for r in g["rules"]}
    for name, metric in REQUIRED_ALERTS.items():
        rule = rules[name]
        assert metric in rule["expr"], name
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["for"].endswith("m")
    assert "up{" in rules["TandemEngineDown"]["expr"]  # a server that stopped answering
    assert "histogram_quantile(0.95" in rules["TandemTTFTHigh"]["expr"]
    for expr in alert_exprs(load_alerts()):
        parse(expr)


def test_scrape_config_reads_the_rules_and_tandem():
    config = _yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tandem"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["tandem:8000"]


def test_compose_mounts_exist_and_provision_the_dashboard():
    compose = _yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"tandem", "prometheus", "grafana"}
    assert services["tandem"]["build"]["context"] == ".."
    assert (DEPLOY / services["tandem"]["build"]["context"] / "Dockerfile").is_file()
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
                mounts[target] = DEPLOY / source
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS
    assert json.loads(mounts["/var/lib/grafana/dashboards/tandem.json"].read_text())["panels"]
    provisioning = mounts["/etc/grafana/provisioning"]
    provider = _yaml(provisioning / "dashboards" / "tandem.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    source = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def test_compose_grace_covers_the_shutdown_timeout():
    tandem = _yaml(DEPLOY / "docker-compose.yml")["services"]["tandem"]
    grace = int(tandem["stop_grace_period"].removesuffix("s"))
    assert grace >= 30 + 5  # the default --shutdown-timeout + uvicorn's close grace
    assert "--host 0.0.0.0" in tandem["command"]

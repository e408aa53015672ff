"""Prometheus configuration and alert rules (promtool), and the Grafana dashboard's structure.

The live test (test_deploy_prometheus_live.py) then runs every expression against a real service.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from deploy_support import DEPLOY

PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fair-latency.json"

# The service's metric families (issue 5's contract); histogram series add _bucket/_sum/_count.
SERVICE_METRICS = {
    "fair_request_duration_seconds": "histogram",
    "fair_stage_duration_seconds": "histogram",
    "fair_batch_size": "histogram",
    "fair_queue_depth": "gauge",
    "fair_requests_rejected_total": "counter",
    "fair_fallback_total": "counter",
    "fair_redis_errors_total": "counter",
    "fair_unknown_items_total": "counter",
    "fair_model_info": "gauge",
    "fair_bundle_manual_pin": "gauge",
}
PROMQL_KEYWORDS = set(
    [
        "sum",
        "by",
        "rate",
        "histogram_quantile",
        "max",
        "count",
        "unless",
        "on",
        "or",
        "and",
        "le",
        "without",
        "increase",
        "absent",
        "avg",
        "min",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
    ]
)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_promtool_check_config(promtool):
    res = run([promtool, "check", "config", str(PROM / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr  # the rules glob matched the rules file


def test_promtool_check_rules(promtool):
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert files
    res = run([promtool, "check", "rules", *files])
    assert res.returncode == 0, res.stdout + res.stderr


def test_alerts_fire_when_they_should(promtool):
    """promtool unit tests: synthetic series for each alert, firing and quiet cases."""
    res = run([promtool, "test", "rules", str(PROM / "tests" / "fair-alerts.test.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_required_alerts_exist():
    rules = yaml.safe_load((PROM / "rules" / "fair-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {
        "FairRecommendLatencyP99High",
        "FairErrorRatioHigh",
        "FairRedisErrors",
        "FairNoReadyModel",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["runbook"].startswith("docs/operations.md#"), name


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def metric_names(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name series (not functions, keywords or label names)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # drop label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # drop range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # drop grouping label lists
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_KEYWORDS and not n.startswith("__")}


def known_series() -> set[str]:
    names = set()
    for family, kind in SERVICE_METRICS.items():
        names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"} if kind == "histogram" else {family}
    return names | {"up"}


def test_dashboard_shape():
    dash = dashboard()
    assert dash["title"] == "FAIR service latency" and dash["uid"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    datasource_uid = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]["uid"]
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == datasource_uid, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == datasource_uid, p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]


def test_dashboard_covers_red_stages_batching_and_model():
    exprs = " ".join(t["expr"] for p in panels(dashboard()) for t in p.get("targets", []))
    for needle in [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "fair_stage_duration_seconds_bucket",
        "fair_batch_size",
        "fair_queue_depth",
        "fair_requests_rejected_total",
        "fair_fallback_total",
        "fair_model_info",
        'status=~"5.."',
    ]:
        assert needle in exprs, needle


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_expressions_use_only_series_the_service_exports(source):
    if source == "dashboard":
        exprs = [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]
        # label_values(METRIC, LABEL): only the metric is a series
        exprs += [
            v["definition"].removeprefix("label_values(").split(",")[0]
            for v in dashboard()["templating"]["list"]
        ]
    else:
        rules = yaml.safe_load((PROM / "rules" / "fair-alerts.yml").read_text())
        exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in exprs:
        unknown = metric_names(expr) - known_series()
        assert not unknown, f"{expr}: {unknown}"

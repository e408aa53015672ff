"""/metrics exposes every series the dashboards and alerts are built on, under the contracted names."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_testlib import scrape

from service.metrics import LATENCY_BUCKETS
from service.settings import LATENCY_OBJECTIVE_S


def test_metrics_exposes_every_series(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    httpx.post(f"{server.url}/users/m1/events", json={"item_ids": ids[:3]})
    httpx.post(f"{server.url}/recommend", json={"user_id": "m1"})
    httpx.post(f"{server.url}/recommend", json={"user_id": "m2-unknown"})
    httpx.post(f"{server.url}/recommend", json={"user_id": "m3", "history": ["??", ids[1]]})
    httpx.post(f"{server.url}/recommend", json={"user_id": "m4", "k": 0})
    metrics = scrape(server.url)
    names = {name for name, _ in metrics}
    labels = {}
    for name, lab in metrics:
        labels.setdefault(name, set()).update(dict(lab))

    for series in (
        "fair_request_duration_seconds_bucket",
        "fair_stage_duration_seconds_bucket",
        "fair_batch_size_bucket",
        "fair_queue_depth",
        "fair_requests_rejected_total",
        "fair_fallback_total",
        "fair_redis_errors_total",
        "fair_unknown_items_total",
        "fair_model_info",
    ):
        assert series in names, series
    assert {"route", "status", "le"} <= labels["fair_request_duration_seconds_bucket"]
    assert {"name", "version", "provider"} == labels["fair_model_info"]
    stages = {dict(lab)["stage"] for n, lab in metrics if n == "fair_stage_duration_seconds_count"}
    assert stages == {"redis", "queue_wait", "inference", "beam_search"}
    assert LATENCY_OBJECTIVE_S in LATENCY_BUCKETS
    objective = frozenset({"route": "/recommend", "status": "200", "le": str(LATENCY_OBJECTIVE_S)}.items())
    assert ("fair_request_duration_seconds_bucket", objective) in metrics
    statuses = {dict(lab)["status"] for n, lab in metrics if n == "fair_request_duration_seconds_count"}
    assert {"200", "422"} <= statuses
    routes = {dict(lab)["route"] for n, lab in metrics if n == "fair_request_duration_seconds_count"}
    assert "/users/{user_id}/events" in routes  # route templates, not raw paths
    reasons = {dict(lab)["reason"] for n, lab in metrics if n == "fair_requests_rejected_total"}
    assert {"queue_full", "timeout", "body_too_large", "invalid", "redis_unavailable", "no_model"} <= reasons


def test_a_dead_workers_live_gauges_leave_the_totals_but_its_counts_stay(tmp_path):
    """Multiprocess mode (several workers): a worker that died with requests queued must not leave its
    queue depth in ``fair_queue_depth`` for good, while the requests it counted stay counted."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dead_worker = "from service import metrics; metrics.QUEUE_DEPTH.set(7); metrics.REDIS_ERRORS.inc()"
    subprocess.run([sys.executable, "-c", dead_worker], env=env, check=True)
    scraping_worker = (
        "from service import metrics; metrics.QUEUE_DEPTH.set(1); metrics.REDIS_ERRORS.inc(); "
        "print(metrics.render()[0].decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", scraping_worker], env=env, check=True, capture_output=True, text=True
    ).stdout
    values = {s.name: s.value for family in text_string_to_metric_families(out) for s in family.samples}
    assert values["fair_queue_depth"] == 1.0
    assert values["fair_redis_errors_total"] == 2.0

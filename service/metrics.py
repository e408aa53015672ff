"""Prometheus metrics of the service. The names are a contract: dashboards and alerts use them.

With several uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` is set (``fair-serve`` does it) and
prometheus-client writes every value to per-process files; ``/metrics`` then aggregates all workers
through ``MultiProcessCollector``, so counters add up whichever worker answers the scrape.

Stage histograms: ``redis`` and ``queue_wait`` are observed per request, ``inference`` and
``beam_search`` once per batch (what one forward pass / one vectorized search costs).
"""

from __future__ import annotations

import functools
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

from service.settings import LATENCY_OBJECTIVE_S

# Buckets straddle the 20 ms p99 objective (and 5 ms p50 objective) finely, then widen to timeouts.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, LATENCY_OBJECTIVE_S, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

STAGES = ("redis", "queue_wait", "inference", "beam_search")

REQUEST_DURATION = Histogram(
    "fair_request_duration_seconds",
    "HTTP request duration by route template and status code",
    ["route", "status"],
    buckets=LATENCY_BUCKETS,
)
STAGE_DURATION = Histogram(
    "fair_stage_duration_seconds",
    "Time spent per stage: redis and queue_wait per request, inference and beam_search per batch",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
BATCH_SIZE = Histogram("fair_batch_size", "Requests per inference batch", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge(
    "fair_queue_depth", "Requests waiting for the inference worker", multiprocess_mode="livesum"
)
# Admission of /recommend (service/overload.py): the requests admitted and not yet answered, how many
# may be (measured throughput x deadline x FAIR_ADMISSION_SHARE), and how late the event loop runs.
IN_FLIGHT = Gauge(
    "fair_requests_in_flight",
    "/recommend requests admitted and not yet answered",
    multiprocess_mode="livesum",
)
ADMISSION_CAPACITY = Gauge(
    "fair_admission_capacity",
    "/recommend requests that may be in flight before new ones get 429 (measured, or FAIR_MAX_IN_FLIGHT; "
    "0 = not measured yet, no cap)",
    multiprocess_mode="livesum",
)
LOOP_LAG = Histogram(
    "fair_event_loop_lag_seconds",
    "How late a timer due every 5 ms ran on the event loop (sampled while requests come)",
    buckets=STAGE_BUCKETS,
)
REJECT_REASONS = (
    "overloaded",
    "queue_full",
    "timeout",
    "body_timeout",
    "body_too_large",
    "invalid",
    "redis_unavailable",
    "redis_full",
    "no_model",
)
REQUESTS_REJECTED = Counter(
    "fair_requests_rejected_total",
    "Requests refused, by reason (overloaded, queue_full, timeout, body_timeout, body_too_large, invalid, "
    "redis_unavailable, redis_full, no_model)",
    ["reason"],
)
FALLBACK = Counter(
    "fair_fallback_total",
    "Recommendations answered from the popular list, by reason (unknown_user, no_known_items)",
    ["reason"],
)
REDIS_ERRORS = Counter("fair_redis_errors_total", "Redis calls that failed or timed out")
UNKNOWN_ITEMS = Counter(
    "fair_unknown_items_total", "History item ids not in the loaded bundle's catalog (skipped)"
)
EVENTS_UNKNOWN_ITEMS = Counter(
    "fair_events_unknown_items_total",
    "Item ids of POST /users/{id}/events that the served bundle's catalog does not know (the write is refused)",
)
# The Redis holding the histories, read from INFO memory at each scrape (summed over a cluster's
# primaries). Every worker asks the same Redis: in multiprocess mode the most recent answer is shown.
REDIS_USED_MEMORY = Gauge(
    "fair_redis_used_memory_bytes",
    "Memory used by the history Redis (INFO memory used_memory; a cluster: summed over its primaries)",
    multiprocess_mode="mostrecent",
)
REDIS_MAXMEMORY = Gauge(
    "fair_redis_maxmemory_bytes",
    "maxmemory of the history Redis (a cluster: summed over its primaries); 0 = no limit (on some node)",
    multiprocess_mode="mostrecent",
)
MODEL_INFO = Gauge(
    "fair_model_info",
    "1 for the bundle being served (name, version, onnxruntime provider in use), 0 for replaced ones",
    ["name", "version", "provider"],
    multiprocess_mode="livemax",
)
REPLACED_ENGINES = Counter(
    "fair_replaced_engines_total",
    "Engines replaced by a reload, by outcome: freed (collected, heap trimmed) or still_referenced (a leak: "
    "the replaced bundle's memory stays in use)",
    ["outcome"],
)
# why a bundle version was not loaded (export.bundle's BundleError reasons, + runtime: onnxruntime or the
# warm-up failed); at startup (a fallback to an older version), by the poller, or by POST /admin/reload
BUNDLE_REFUSE_REASONS = ("signature", "checksum", "limit", "unsafe_files", "invalid", "runtime")
BUNDLES_REFUSED = Counter(
    "fair_bundles_refused_total",
    "Bundle versions that failed to load, by reason (signature, checksum, limit, unsafe_files, invalid, "
    "runtime); the service log has the message",
    ["reason"],
)
MANUAL_PIN = Gauge(
    "fair_bundle_manual_pin",
    "The bundle version pinned by POST /admin/reload {version} (polling paused); 0 when none is pinned",
    multiprocess_mode="livemax",
)


@functools.cache
def request_duration(route: str, status: str):
    """The ``fair_request_duration_seconds`` child of one (route template, status): ``labels()``
    hashes and validates its arguments on every call, which costs more than the observation itself.
    Routes are templates, so the cache stays small."""
    return REQUEST_DURATION.labels(route=route, status=status)


@functools.cache
def stage(name: str):
    """The ``fair_stage_duration_seconds`` child of one stage (cached, as ``request_duration``)."""
    return STAGE_DURATION.labels(stage=name)


def init_series() -> None:
    """Create the labelled children we know of, so every series is visible before its first event."""
    for stage in STAGES:
        STAGE_DURATION.labels(stage=stage)
    for reason in REJECT_REASONS:
        REQUESTS_REJECTED.labels(reason=reason)
    for reason in ("unknown_user", "no_known_items"):
        FALLBACK.labels(reason=reason)
    for reason in BUNDLE_REFUSE_REASONS:
        BUNDLES_REFUSED.labels(reason=reason)


def set_model_info(name: str, version: int, provider: str, previous: tuple[str, str, str] | None) -> None:
    """Mark the served bundle with 1 and the replaced one with 0 (multiprocess files cannot drop series)."""
    if previous is not None:
        MODEL_INFO.labels(*previous).set(0)
    MODEL_INFO.labels(name=name, version=str(version), provider=provider).set(1)


def set_manual_pin(version: int | None) -> None:
    MANUAL_PIN.set(version or 0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """The exposition text: this process's registry, or every worker's files in multiprocess mode."""
    directory = multiprocess_dir()
    if directory:
        drop_dead_workers(directory)
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def drop_dead_workers(directory: str) -> list[int]:
    """Remove the live-gauge files of worker processes that no longer exist; returns their pids.

    uvicorn replaces a crashed worker under a new pid and has no exit hook from which to call
    ``mark_process_dead``, so without this the dead worker's last queue depth would stay in
    ``fair_queue_depth`` (a live sum) for good. Run at each scrape: a directory listing and one
    ``kill(pid, 0)`` per worker. Counters and histograms keep their files: a dead worker's requests
    did happen.
    """
    pids = set()
    for name in os.listdir(directory):
        stem, _, pid_text = name.removesuffix(".db").rpartition("_")
        if name.startswith("gauge_live") and name.endswith(".db") and stem and pid_text.isdigit():
            pids.add(int(pid_text))
    dead = [pid for pid in sorted(pids) if not _alive(pid)]
    for pid in dead:
        _mp.mark_process_dead(pid, directory)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True

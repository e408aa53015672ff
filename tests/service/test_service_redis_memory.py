"""Redis memory has a bound (issue 24): idle histories expire, only catalog items are stored, the embedded
server is capped with a policy that never evicts silently, and /metrics reports Redis memory."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from service_testlib import LiveServer, make_settings, sample, scrape

from service.redis_store import HistoryStore, async_client, sync_client
from service.settings import HISTORY_TTL_S

CAP = 64 * 1024 * 1024


def redis_of(live: LiveServer):
    """A client of the Redis the live server uses (embedded or FAIR_TEST_REDIS_URL)."""
    s = live.settings
    url = s.redis_url or live.state.embedded.url
    return sync_client(url, s.redis_cluster), url


@pytest.fixture(scope="module")
def capped(tiny_bundle, tmp_path_factory):
    """A server on an embedded Redis of its own (so the test may fill it), capped at 64 MiB."""
    data_dir = tmp_path_factory.mktemp("capped-redis")
    settings = make_settings(
        tiny_bundle, {"data_dir": data_dir}, bundle=tiny_bundle.model_dir / "1", redis_maxmemory=CAP
    )
    with LiveServer(settings) as live:
        yield live


# ---- idle histories expire --------------------------------------------------------------------------
def test_the_append_script_sets_and_refreshes_the_history_ttl(server):
    client, _ = redis_of(server)
    user = f"ttl-{uuid.uuid4().hex[:8]}"
    key = server.settings.history_key(user)
    assert httpx.post(f"{server.url}/users/{user}/events", json={"item_ids": ["item0"]}).status_code == 200
    assert HISTORY_TTL_S - 60 <= client.ttl(key) <= HISTORY_TTL_S  # set by the append itself

    client.expire(key, 100)  # as if the user had been idle for (TTL - 100 s)
    assert httpx.get(f"{server.url}/users/{user}/history").json()["item_ids"] == ["item0"]
    assert httpx.post(f"{server.url}/recommend", json={"user_id": user}).status_code == 200
    assert client.ttl(key) <= 100  # reading (history, /recommend) does not keep a history alive

    assert httpx.post(f"{server.url}/users/{user}/events", json={"item_ids": ["item1"]}).status_code == 200
    assert HISTORY_TTL_S - 60 <= client.ttl(key) <= HISTORY_TTL_S  # every append resets the clock
    client.close()


def test_a_history_ttl_of_zero_means_no_expiry(server):
    client, url = redis_of(server)
    s = server.settings
    user = f"ttl0-{uuid.uuid4().hex[:8]}"

    async def append(ttl_s: int) -> None:
        store = HistoryStore(
            async_client(url, s.redis_cluster),
            prefix=s.history_key_prefix,
            cluster=s.redis_cluster,
            history_ttl_s=ttl_s,
            idem_prefix=s.idempotency_key_prefix,
        )
        try:
            await store.append(user, ["item0"])
        finally:
            await store.close()

    asyncio.run(append(50))
    assert 0 < client.ttl(s.history_key(user)) <= 50
    asyncio.run(append(0))
    assert client.ttl(s.history_key(user)) == -1  # FAIR_HISTORY_TTL_S=0: the expiry is removed
    client.close()


# ---- only catalog items -----------------------------------------------------------------------------
def test_unknown_items_are_refused_counted_and_not_stored(server):
    user = f"unk-{uuid.uuid4().hex[:8]}"
    before = scrape(server.url)
    body = {"item_ids": ["item0", "no-such-item", "item1", "x" * 256]}
    r = httpx.post(f"{server.url}/users/{user}/events", json=body, headers={"Idempotency-Key": "u-1"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "unknown_item" and err["field"] == "item_ids.1"
    assert "'no-such-item'" in err["message"] and "2 of 4" in err["message"]
    after = scrape(server.url)
    assert sample(after, "fair_events_unknown_items_total") - sample(
        before, "fair_events_unknown_items_total"
    ) == pytest.approx(2)
    assert sample(after, "fair_requests_rejected_total", reason="invalid") > sample(
        before, "fair_requests_rejected_total", reason="invalid"
    )
    assert httpx.get(f"{server.url}/users/{user}/history").json()["item_ids"] == []  # nothing stored
    # the refused write left no dedupe record: the corrected write with the same key is applied
    ok = httpx.post(
        f"{server.url}/users/{user}/events",
        json={"item_ids": ["item0", "item1"]},
        headers={"Idempotency-Key": "u-1"},
    )
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
    assert ok.json()["history_length"] == 2


def test_events_before_a_model_is_loaded_are_503_no_model(tiny_bundle, redis_settings):
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=None)) as live:
        r = httpx.post(f"{live.url}/users/u/events", json={"item_ids": ["item0"]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_model" and "retry-after" in r.headers


# ---- maxmemory, noeviction --------------------------------------------------------------------------
def test_the_embedded_redis_runs_with_the_configured_maxmemory_and_noeviction(capped):
    config = capped.state.embedded._probe().config_get("maxmemory*")
    assert config["maxmemory"] == str(CAP)
    assert config["maxmemory-policy"] == "noeviction"


def test_a_full_redis_refuses_writes_with_503_and_keeps_every_history(capped):
    url, probe = capped.url, capped.state.embedded._probe()
    assert httpx.post(f"{url}/users/full/events", json={"item_ids": ["item0", "item1"]}).status_code == 200
    before = scrape(url)
    probe.config_set("maxmemory", 1)  # full: whatever it holds is over the limit
    try:
        r = httpx.post(f"{url}/users/full/events", json={"item_ids": ["item2"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "redis_full"
        new_user = httpx.post(f"{url}/users/full-new/events", json={"item_ids": ["item2"]})
        assert new_user.status_code == 503
        # reads still work and nothing was evicted or half-written
        assert httpx.get(f"{url}/users/full/history").json()["item_ids"] == ["item0", "item1"]
        assert httpx.post(f"{url}/recommend", json={"user_id": "full"}).json()["fallback"] is None
        after = scrape(url)
        assert sample(after, "fair_requests_rejected_total", reason="redis_full") - sample(
            before, "fair_requests_rejected_total", reason="redis_full"
        ) == pytest.approx(2)
        assert sample(after, "fair_redis_maxmemory_bytes") == 1
    finally:
        probe.config_set("maxmemory", CAP)
    assert httpx.post(f"{url}/users/full/events", json={"item_ids": ["item2"]}).json()["history_length"] == 3
    assert probe.exists(capped.settings.history_key("full-new")) == 0


# ---- /metrics ---------------------------------------------------------------------------------------
def test_metrics_report_redis_memory(capped):
    probe = capped.state.embedded._probe()
    metrics = scrape(capped.url)
    used = probe.info("memory")["used_memory"]
    assert sample(metrics, "fair_redis_maxmemory_bytes") == CAP
    assert 0.5 * used < sample(metrics, "fair_redis_used_memory_bytes") < 2 * used
    # refreshed at every scrape
    probe.set("filler", "x" * 4_000_000)
    try:
        deadline = time.monotonic() + 5
        while sample(scrape(capped.url), "fair_redis_used_memory_bytes") < used + 3_000_000:
            assert time.monotonic() < deadline, "fair_redis_used_memory_bytes not refreshed"
            time.sleep(0.1)
    finally:
        probe.delete("filler")

"""Idempotent writes: an event is stored once, whether the Redis client or the caller sends it twice.

Each test freezes a Redis server it owns (SIGSTOP) longer than FAIR_REDIS_TIMEOUT_MS, as a stalled or
overloaded Redis does, so the first copy of the write reaches Redis but its answer comes too late.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from service_testlib import LiveServer, make_settings

from service.embedded_redis import EmbeddedRedis
from service.redis_store import dedupe_key


@contextmanager
def own_redis_server(tiny_bundle, **overrides):
    with tempfile.TemporaryDirectory(prefix="fair-idem-") as data_dir:
        redis_server = EmbeddedRedis(data_dir).start()
        try:
            settings = make_settings(tiny_bundle, {"redis_url": redis_server.url}, **overrides)
            with LiveServer(settings) as live:
                yield live, redis_server
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)  # never leave a frozen server behind
            redis_server.stop()


def frozen_for(redis_server: EmbeddedRedis, seconds: float) -> threading.Thread:
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    thaw = threading.Timer(seconds, os.kill, (redis_server.proc.pid, signal.SIGCONT))
    thaw.start()
    return thaw


def test_a_write_retried_by_the_redis_client_is_stored_once(tiny_bundle):
    """The issue's repro: a stall longer than the Redis timeout stored the item twice and answered 200
    (the client library re-sent the MULTI/RPUSH/EXEC after the first copy landed). The stall (0.7 s)
    ends well inside the library's second attempt (0.5 s timeout each), even on a busy machine."""
    with own_redis_server(tiny_bundle, redis_timeout_ms=500) as (live, redis_server):
        warm = httpx.get(f"{live.url}/users/d1/history")  # a pooled connection, as in traffic
        assert warm.status_code == 200
        thaw = frozen_for(redis_server, 0.7)
        r = httpx.post(f"{live.url}/users/d1/events", json={"item_ids": ["once"]}, timeout=10)
        thaw.join()
        assert r.status_code == 200, r.text  # the client's retry found the recorded answer
        assert "idempotent-replayed" not in r.headers  # the caller sent no key: nothing to tell it
        assert httpx.get(f"{live.url}/users/d1/history").json()["item_ids"] == ["once"]


def test_a_client_retry_with_an_idempotency_key_is_applied_once(tiny_bundle):
    with own_redis_server(tiny_bundle, redis_timeout_ms=100, request_timeout_ms=5_000) as (
        live,
        redis_server,
    ):
        url, key = f"{live.url}/users/d2/events", {"Idempotency-Key": "evt-7f3a"}
        assert httpx.post(url, json={"item_ids": ["a"]}).json()["history_length"] == 1
        thaw = frozen_for(redis_server, 1.0)
        first = httpx.post(url, json={"item_ids": ["b", "c"]}, headers=key, timeout=10)
        assert first.status_code == 503, first.text  # timed out: the caller cannot know it was stored
        thaw.join()
        retry = httpx.post(url, json={"item_ids": ["b", "c"]}, headers=key, timeout=10)
        assert retry.status_code == 200, retry.text
        assert retry.json()["history_length"] == 3
        assert retry.headers["idempotent-replayed"] == "true"
        assert httpx.get(f"{live.url}/users/d2/history").json()["item_ids"] == ["a", "b", "c"]

        again = httpx.post(url, json={"item_ids": ["b", "c"]}, headers=key)
        assert again.json()["history_length"] == 3  # the first answer, not the current length + 2
        conflict = httpx.post(url, json={"item_ids": ["x"]}, headers=key)
        assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
        # the key is scoped to the user: another user's write with it is a different write
        other = httpx.post(f"{live.url}/users/d3/events", json={"item_ids": ["x"]}, headers=key)
        assert other.status_code == 200 and "idempotent-replayed" not in other.headers
        assert httpx.get(f"{live.url}/users/d2/history").json()["item_ids"] == ["a", "b", "c"]


def test_the_dedupe_key_expires_after_the_configured_ttl(tiny_bundle):
    with own_redis_server(tiny_bundle, idempotency_ttl_s=1) as (live, redis_server):
        url, key = f"{live.url}/users/d4/events", {"Idempotency-Key": "k1"}
        assert httpx.post(url, json={"item_ids": ["a"]}, headers=key).json()["history_length"] == 1
        idem = dedupe_key(live.settings.history_key("d4"), "k1")
        assert 0 < redis_server._probe().pttl(idem) <= 1000
        assert httpx.post(url, json={"item_ids": ["a"]}, headers=key).json()["history_length"] == 1  # replay
        time.sleep(1.3)  # past the TTL the key is forgotten: the same key is a new write
        assert httpx.post(url, json={"item_ids": ["a"]}, headers=key).json()["history_length"] == 2


@pytest.mark.parametrize("bad", ["", "with space", "x" * 129, "é"])
def test_invalid_idempotency_keys_are_refused(server, bad):
    r = httpx.post(
        f"{server.url}/users/d5/events", json={"item_ids": ["a"]}, headers={"Idempotency-Key": bad.encode()}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "header.Idempotency-Key", r.text


def test_dedupe_keys_share_the_history_keys_cluster_slot():
    from redis.crc import key_slot

    for history_key in ["fair:history:alice", "fair:history:{tagged}x", "fair:history:a{b"]:
        idem = dedupe_key(history_key, "token")
        assert key_slot(idem.encode()) == key_slot(history_key.encode()), history_key

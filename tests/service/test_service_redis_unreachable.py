"""An unreachable Redis is a 503 (never a 500) for every client kind, the Cluster client included.

The Cluster client reports "no node reachable" with ``RedisClusterException``, which is not a
``RedisError``: it must still count as Redis being unavailable. Real clients against a real closed port.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from service_testlib import LiveServer, make_settings

from service.load_histories import main as load_histories_main
from service.redis_store import HistoryStore, StoreUnavailable, async_client


def _dead_url() -> str:
    """A redis:// URL on a local port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("cluster", [False, True])
def test_store_reports_unreachable_redis_as_unavailable(cluster):
    async def run():
        store = HistoryStore(async_client(_dead_url(), cluster=cluster, timeout_s=0.5))
        try:
            assert await store.ping() is False
            with pytest.raises(StoreUnavailable):
                await store.get("u")
            with pytest.raises(StoreUnavailable):
                await store.append("u", ["a"])
        finally:
            await store.close()

    asyncio.run(run())


def test_unreachable_cluster_is_503_and_not_ready(tiny_bundle, tmp_path):
    redis = {"redis_url": _dead_url(), "redis_cluster": True, "data_dir": tmp_path}
    with LiveServer(make_settings(tiny_bundle, redis, redis_timeout_ms=500)) as live:
        r = httpx.post(f"{live.url}/recommend", json={"user_id": "u"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable", r.text
        assert httpx.post(f"{live.url}/users/u/events", json={"item_ids": ["item0"]}).status_code == 503
        ready = httpx.get(f"{live.url}/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False


def test_load_histories_unreachable_cluster_is_a_one_line_error(capsys):
    args = ["--data", "synthetic:items=20,users=5,seed=1", "--redis", _dead_url(), "--cluster"]
    assert load_histories_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fair-load-histories: redis") and "\n" not in err

"""What the service tells strangers and what it lets them hold: no internal paths or addresses in public
answers, optional API tokens on the data plane, a deadline on reading a request body."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time

import httpx
import numpy as np
from service_testlib import ADMIN_TOKEN, LiveServer, make_settings

from service.batcher import Job
from service.embedded_redis import EmbeddedRedis

API_TOKEN = "data-plane-token-0123456789"


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_model_info_shows_no_file_paths_except_to_the_admin(server, tiny_bundle):
    public = httpx.get(server.url + "/model").json()
    assert "path" not in public
    leaked = [s for s in _strings(public) if s.startswith("/") or str(tiny_bundle.model_dir) in s]
    assert not leaked, leaked
    assert public["manifest"]["source"]["checkpoint_sha256"]  # what is not a path stays

    assert httpx.get(server.url + "/admin/model").status_code == 401
    admin = httpx.get(server.url + "/admin/model", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert admin["path"] == str(tiny_bundle.model_dir / "1")
    assert admin["manifest"]["source"]["checkpoint"].startswith("/")


def test_redis_outage_answers_do_not_name_its_address(tiny_bundle):
    with tempfile.TemporaryDirectory(prefix="fair-exp-") as data_dir:
        redis_server = EmbeddedRedis(data_dir).start()
        settings = make_settings(tiny_bundle, {"redis_url": redis_server.url}, redis_timeout_ms=100)
        with LiveServer(settings) as live:
            redis_server.stop()
            answers = [
                httpx.post(live.url + "/recommend", json={"user_id": "u"}),
                httpx.post(live.url + "/users/u/events", json={"item_ids": ["item0"]}),
                httpx.get(live.url + "/users/u/history"),
            ]
            for r in answers:
                assert r.status_code == 503 and r.json()["error"]["code"] == "redis_unavailable"
                assert str(redis_server.socket_path) not in r.text and "redis.sock" not in r.text, r.text
                assert data_dir not in r.text


def test_api_tokens_guard_the_data_plane(tiny_bundle, redis_settings):
    settings = make_settings(tiny_bundle, redis_settings, api_tokens=[API_TOKEN, "second-token-abcdefgh"])
    with LiveServer(settings) as live:
        ok = {"Authorization": f"Bearer {API_TOKEN}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN}):
            for r in (
                httpx.post(live.url + "/recommend", json={"user_id": "t"}, headers=headers),
                httpx.post(live.url + "/users/t/events", json={"item_ids": ["item0"]}, headers=headers),
                httpx.get(live.url + "/users/t/history", headers=headers),
            ):
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
                assert r.json()["error"]["code"] == "unauthorized"
        # checked before the body is read: a stranger's invalid body is 401, not 422 (nothing parsed)
        junk = httpx.post(
            live.url + "/recommend", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert junk.status_code == 401
        ids = tiny_bundle.dataset.item_ids[:2]
        assert (
            httpx.post(live.url + "/users/t/events", json={"item_ids": list(ids)}, headers=ok).status_code
            == 200
        )
        second = {"Authorization": "Bearer second-token-abcdefgh"}
        assert httpx.get(live.url + "/users/t/history", headers=second).json()["item_ids"] == list(ids)
        assert httpx.post(live.url + "/recommend", json={"user_id": "t"}, headers=ok).status_code == 200
        # probes and metrics stay open for the orchestrator and Prometheus; the admin keeps its own token
        for path in ("/healthz", "/readyz", "/metrics", "/model"):
            assert httpx.get(live.url + path).status_code == 200, path
        assert httpx.post(live.url + "/admin/reload", headers=ok).status_code == 401
        spec = httpx.get(live.url + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["apiToken"]["scheme"] == "bearer"
        assert spec["paths"]["/recommend"]["post"]["security"] == [{"apiToken": []}]
        assert "401" in spec["paths"]["/users/{user_id}/history"]["get"]["responses"]


def test_a_body_that_never_finishes_gets_408_and_the_connection_closed(tiny_bundle, redis_settings):
    settings = make_settings(tiny_bundle, redis_settings, body_timeout_ms=500)
    with LiveServer(settings) as live:
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"user_id": '
            )
            t0 = time.monotonic()
            received = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                received += chunk
            took = time.monotonic() - t0
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), received
        assert json.loads(body)["error"]["code"] == "body_timeout"
        assert 0.4 < took < 5, took
        # a complete request on a new connection is unaffected
        assert httpx.post(live.url + "/recommend", json={"user_id": "fast"}).status_code == 200


class _SlowEngine:
    """The served engine, 50 ms slower per batch: a saturated model, deterministically."""

    def __init__(self, engine, delay_s: float = 0.05):
        self._engine, self._delay_s = engine, delay_s

    def forward(self, histories):
        time.sleep(self._delay_s)
        return self._engine.forward(histories)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_an_overloaded_service_refuses_recommend_before_reading_the_body(tiny_bundle, redis_settings):
    """With more inference work queued than the deadline allows, /recommend gets 429 at once: the body is
    not even parsed (an invalid one gets 429, not 422), so refusing costs the event loop little."""
    settings = make_settings(tiny_bundle, redis_settings, request_timeout_ms=1000, max_batch_size=1)
    with LiveServer(settings) as live:
        ids = tiny_bundle.dataset.item_ids
        assert (
            httpx.post(live.url + "/recommend", json={"user_id": "w", "history": ids[:3]}).status_code == 200
        )
        batcher = live.state.batcher
        assert httpx.post(live.url + "/recommend", json={"no": "user id"}).status_code == 422  # idle: parsed
        # A backlog of slow jobs (as a burst on a saturated model leaves behind), queued straight into the
        # service's batcher: 60 x 50 ms = 3 s of work, three deadlines.
        loop = asyncio.new_event_loop()
        slow, history = _SlowEngine(live.state.engine), np.arange(5, dtype=np.int64)
        for n in range(60):
            batcher.submit(Job(slow, f"b{n}", history, None, 10, 10, loop.create_future(), loop))
        try:
            deadline = time.monotonic() + 10
            while batcher.expected_wait_s() <= 1.0:  # the cost estimate catches up with the slow batches
                assert time.monotonic() < deadline and batcher.depth, "the backlog was never measured as slow"
                time.sleep(0.02)
            r = httpx.post(live.url + "/recommend", json={"no": "user id"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "overloaded"
            # other routes are not inference-bound and stay served
            assert httpx.get(live.url + "/users/w/history").status_code == 200
        finally:
            deadline = time.monotonic() + 30
            while batcher.depth and time.monotonic() < deadline:  # let the backlog drain
                time.sleep(0.1)
            loop.close()
        time.sleep(0.2)
        assert (
            httpx.post(live.url + "/recommend", json={"user_id": "w", "history": ids[:3]}).status_code == 200
        )

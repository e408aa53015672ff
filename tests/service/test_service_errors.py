"""The documented error answers: JSON envelope, status codes, OpenAPI listing, admin auth, timeouts."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from service_testlib import LiveServer, make_settings


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "user_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 101}, "k"),
        ({"user_id": "u", "k": "ten"}, "k"),
        ({"user_id": "u", "beam_size": 0}, "beam_size"),
        ({"user_id": "u", "history": "not-a-list"}, "history"),
        ({"user_id": "u", "surprise": 1}, "surprise"),
    ],
)
def test_invalid_recommend_bodies_name_the_field(server, body, field):
    err = error_of(httpx.post(server.url + "/recommend", json=body), 422)
    assert err["code"] == "invalid_request" and err["field"] == field


def test_malformed_json_and_bad_events(server):
    r = httpx.post(
        server.url + "/recommend", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert error_of(r, 422)["code"] == "invalid_request"
    err = error_of(httpx.post(server.url + "/users/u/events", json={"item_ids": []}), 422)
    assert err["field"] == "item_ids"


def test_oversize_body_is_413(server):
    big = {"user_id": "u", "history": ["x" * 200] * 600}  # ~130 KB > 64 KiB default limit
    assert error_of(httpx.post(server.url + "/recommend", json=big), 413)["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced on the streamed bytes
        yield b'{"user_id": "u", "history": ['
        for _ in range(2000):
            yield b'"' + b"y" * 100 + b'",'
        yield b'"z"]}'

    r = httpx.post(server.url + "/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "body_too_large"


def test_unknown_route_and_method_use_the_envelope(server):
    assert error_of(httpx.get(server.url + "/nope"), 404)["code"] == "not_found"
    assert error_of(httpx.get(server.url + "/recommend"), 405)["code"] == "method_not_allowed"


def test_admin_reload_needs_the_bearer_token(server):
    assert error_of(httpx.post(server.url + "/admin/reload"), 401)["code"] == "unauthorized"
    r = httpx.post(server.url + "/admin/reload", headers={"Authorization": "Bearer wrong"})
    assert error_of(r, 401)["code"] == "unauthorized"
    r = httpx.post(
        server.url + "/admin/reload",
        json={"version": 99},
        headers={"Authorization": "Bearer test-admin-token"},
    )
    assert error_of(r, 404)["code"] == "bundle_not_found"


def test_openapi_lists_every_status_code(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    expected = {
        ("/recommend", "post"): {"200", "408", "413", "422", "429", "500", "503", "504"},
        ("/users/{user_id}/events", "post"): {"200", "408", "409", "413", "422", "500", "503", "504"},
        ("/users/{user_id}/history", "get"): {"200", "422", "500", "503", "504"},
        ("/healthz", "get"): {"200", "500", "503"},
        ("/readyz", "get"): {"200", "500", "503"},
        ("/metrics", "get"): {"200", "500"},
        ("/model", "get"): {"200", "500", "503"},
        ("/admin/model", "get"): {"200", "401", "500", "503"},
        ("/admin/reload", "post"): {"200", "401", "404", "408", "409", "413", "422", "500"},
    }
    for (path, method), codes in expected.items():
        assert set(spec["paths"][path][method]["responses"]) == codes, path
    ref = spec["paths"]["/recommend"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert ref["$ref"].endswith("/ErrorResponse")


def test_timeout_is_504_and_admin_off_without_token(tiny_bundle, redis_settings):
    settings = make_settings(tiny_bundle, redis_settings, request_timeout_ms=0.001, admin_token=None)
    with LiveServer(settings) as live:
        err = error_of(httpx.post(live.url + "/recommend", json={"user_id": "slow"}), 504)
        assert err["code"] == "timeout"
        assert error_of(httpx.post(live.url + "/admin/reload"), 404)["code"] == "not_found"
        assert "/admin/reload" not in httpx.get(live.url + "/openapi.json").json()["paths"]


def test_a_full_inference_queue_is_429_with_retry_after(tiny_bundle, redis_settings):
    """A burst larger than the queue: every request is answered, 200 or 429 (never a hang or a 500),
    and each 429 carries the envelope and Retry-After so clients back off."""
    settings = make_settings(tiny_bundle, redis_settings, queue_size=1, max_batch_size=1, max_wait_ms=0)
    history = [str(i) for i in tiny_bundle.table.item_ids[:4]]

    async def burst(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            body = {"user_id": "burst", "history": history}
            return await asyncio.gather(*(client.post("/recommend", json=body) for _ in range(200)))

    with LiveServer(settings) as live:
        responses = asyncio.run(burst(live.url))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) > 0 and statuses.count(429) > 0, statuses
    for r in responses:
        if r.status_code == 429:
            assert error_of(r, 429)["code"] == "queue_full"
            assert r.headers["Retry-After"] == "1"

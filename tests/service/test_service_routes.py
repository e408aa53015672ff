"""Protection is structural: every route is guarded by its router's route class or is on the public list,
the token is checked before anything is parsed, and the holes an outside probe found stay closed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import ValidationError
from service_testlib import ADMIN_TOKEN, LiveServer, make_settings
from starlette.routing import Route

from service.app import create_app
from service.auth import ADMIN_GUARD, API_GUARD, DataPlaneRoute, PublicRoute, guard_of
from service.settings import Settings

API_TOKEN = "data-plane-token-0123456789"
# Deliberately open: probes, metrics, the public model summary, and FastAPI's own docs pages.
PUBLIC = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/model",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}
ADMIN = {"/admin/model", "/admin/reload"}


def _walk(routes) -> list:
    """Every route of the app, into included routers (FastAPI >= 0.16x keeps them as one lazy entry
    each, with the router's own routes under ``original_router``; older releases flatten them)."""
    found = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found += _walk(inner.routes) if inner is not None else [route]
    return found


def _routes(settings: Settings) -> dict[str, object]:
    return {route.path: route for route in _walk(create_app(settings).routes)}


def test_every_route_is_guarded_or_listed_public():
    routes = _routes(Settings(api_tokens=[API_TOKEN], admin_token=ADMIN_TOKEN))
    assert set(routes) >= ADMIN | PUBLIC
    for path, route in routes.items():
        guard = guard_of(route)
        if path in PUBLIC:
            assert guard is None, f"{path} is on the public list but guarded"
            assert isinstance(route, PublicRoute) or (
                isinstance(route, Route) and not isinstance(route, APIRoute)
            )
        elif path.startswith("/admin/"):
            assert guard is ADMIN_GUARD, path
        else:
            # a route that took no decision (a plain APIRoute) lands here and fails
            assert guard is API_GUARD, f"{path}: neither protected nor on the public list"


def test_every_operation_refuses_a_stranger_unless_public(guarded):
    """The same, by behaviour: each operation of the live app's schema, without a token."""
    spec = httpx.get(guarded.url + "/openapi.json").json()
    assert spec["paths"]
    for path, operations in spec["paths"].items():
        url = guarded.url + path.replace("{user_id}", "someone")
        for method, op in operations.items():
            r = httpx.request(method.upper(), url, content=b"{", headers={"content-type": "application/json"})
            if path in PUBLIC:
                assert r.status_code != 401 and "security" not in op, (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert op["security"] and "401" in op["responses"], (method, path)


def test_no_admin_route_exists_without_an_admin_token():
    assert not ADMIN & set(_routes(Settings(admin_token=None)))


@pytest.mark.parametrize("value", ["", "short", " " * 20, "x" * 15, " padded-admin-token-0123 "])
def test_an_empty_or_short_admin_token_is_refused(value):
    with pytest.raises(ValidationError, match="FAIR_ADMIN_TOKEN"):
        Settings(admin_token=value)


def test_fair_serve_refuses_an_empty_admin_token_at_startup(tmp_path):
    env = {**os.environ, "FAIR_ADMIN_TOKEN": "", "FAIR_DATA_DIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "FAIR_ADMIN_TOKEN" in r.stderr and "at least 16 characters" in r.stderr
    assert "--admin-token" not in r.stderr  # env-only: no flag to name


@pytest.fixture(scope="module")
def guarded(tiny_bundle, redis_settings):
    settings = make_settings(tiny_bundle, redis_settings, api_tokens=[API_TOKEN], body_timeout_ms=5_000)
    with LiveServer(settings) as live:
        yield live


def test_a_route_added_under_a_new_prefix_is_protected_by_its_class(tiny_bundle, redis_settings):
    """What the path-prefix check got wrong: protection follows the route, not a list of paths."""
    extra = APIRouter(prefix="/brand-new", route_class=DataPlaneRoute)

    @extra.get("/thing")
    async def thing() -> dict:
        return {"ok": True}

    settings = make_settings(tiny_bundle, redis_settings, api_tokens=[API_TOKEN])
    live = LiveServer(settings)
    live.app.include_router(extra)
    with live:
        assert httpx.get(live.url + "/brand-new/thing").status_code == 401
        ok = httpx.get(live.url + "/brand-new/thing", headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert ok.status_code == 200 and ok.json() == {"ok": True}


def test_admin_checks_the_token_before_parsing_the_body(guarded):
    r = httpx.post(guarded.url + "/admin/reload", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def _raw(url: str, request: bytes) -> tuple[bytes, float]:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.monotonic()
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
        return head, time.monotonic() - t0


@pytest.mark.parametrize("path", ["/admin/reload", "/recommend", "/users/u/events"])
def test_a_body_announced_and_never_sent_gets_401_at_once_not_408(guarded, path):
    head, took = _raw(
        guarded.url,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 401"), head
    assert took < 4, took  # the body deadline is 5 s: the answer did not wait for it


@pytest.mark.parametrize(
    ("path", "good"),
    [("/recommend", f"Bearer {API_TOKEN}"), ("/admin/model", f"Bearer {ADMIN_TOKEN}")],
)
def test_two_authorization_headers_are_refused_whatever_their_order(guarded, path, good):
    method = "POST" if path == "/recommend" else "GET"
    body = {"user_id": "dup"} if method == "POST" else None
    for headers in ([("Authorization", "Bearer wrong"), ("Authorization", good)],
                    [("Authorization", good), ("Authorization", "Bearer wrong")],
                    [("Authorization", good), ("Authorization", good)]):  # fmt: skip
        r = httpx.request(method, guarded.url + path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "exactly one Authorization header" in r.json()["error"]["message"]
    assert (
        httpx.request(method, guarded.url + path, json=body, headers={"Authorization": good}).status_code
        == 200
    )

"""The API contract: what the OpenAPI schema says is exactly what is accepted and answered.

Cases found by schemathesis and by hand: unparseable bodies answered with an unlisted 400, values the
schema forbids (JSON true as k) accepted, a JSON syntax error's character offset reported as the field,
invalid UTF-8 in a path user id silently merging users, the admin token declared as a plain header.
"""

from __future__ import annotations

import httpx
import pytest
from service_testlib import ADMIN_TOKEN

JSON = {"content-type": "application/json"}


def invalid(r: httpx.Response) -> dict:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    return err


@pytest.mark.parametrize(
    "body",
    [b'{"user_id": "\xff\xfe"}', b"[" * 30_000 + b"]" * 30_000],
    ids=["invalid-utf8", "nested-30000-deep"],
)
def test_unparseable_bodies_are_the_documented_422(server, body):
    for path in ("/recommend", "/users/u/events"):
        assert invalid(httpx.post(server.url + path, content=body, headers=JSON))["field"] == "body"


def test_a_json_syntax_error_names_the_body_not_an_offset(server):
    err = invalid(httpx.post(server.url + "/recommend", content=b"hello", headers=JSON))
    assert err["field"] == "body"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "1", "k": True}, "k"),
        ({"user_id": "1", "k": 5.5}, "k"),  # 5.0 is accepted: an integer to JSON Schema
        ({"user_id": "1", "k": "5"}, "k"),
        ({"user_id": "1", "beam_size": True}, "beam_size"),
        ({"user_id": "1", "exclude_seen": 0}, "exclude_seen"),
        ({"user_id": "1", "exclude_seen": "false"}, "exclude_seen"),
    ],
)
def test_values_the_schema_forbids_are_refused(server, body, field):
    assert invalid(httpx.post(server.url + "/recommend", json=body))["field"] == field


def test_reload_version_must_be_an_integer(server):
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for version in (True, "1", 1.5):
        r = httpx.post(server.url + "/admin/reload", json={"version": version}, headers=auth)
        assert invalid(r)["field"] == "version"


def test_path_user_ids_that_are_not_utf8_are_refused_not_merged(server):
    for raw in ("%ff", "%fe", "ok%c3"):
        assert invalid(httpx.get(f"{server.url}/users/{raw}/history"))["field"] == "path"
        r = httpx.post(f"{server.url}/users/{raw}/events", json={"item_ids": ["item0"]})
        assert invalid(r)["field"] == "path"
    # valid UTF-8, percent-encoded, is a user id like any other
    r = httpx.post(f"{server.url}/users/%C3%A9t%C3%A9/events", json={"item_ids": ["item0"]})
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/users/%C3%A9t%C3%A9/history").json()["user_id"] == "été"


def test_the_admin_token_is_a_bearer_security_scheme(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the token in FAIR_ADMIN_TOKEN",
    }
    reload = spec["paths"]["/admin/reload"]["post"]
    assert reload["security"] == [{"adminToken": []}]
    params = [p["name"].lower() for p in reload.get("parameters", [])]
    assert "authorization" not in params
    # data-plane routes are open unless FAIR_API_TOKENS is set (tests/service/test_service_exposure.py)
    assert "security" not in spec["paths"]["/recommend"]["post"]

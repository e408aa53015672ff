"""How request bodies are read (issue 23, E6 and E7).

E6: duplicated JSON keys were accepted and the last won (``{"k": 1000, "k": 2}`` -> k=2), so a gateway
that reads the first saw another request than the service ran. Now a duplicated key at any depth is a
422 ``invalid_request`` whose ``field`` is the key's path.

E7: the schema says ``type: integer`` for k, beam_size and the reload version, which JSON Schema
defines as any number with a zero fractional part, yet ``20.0`` was refused. Now the service accepts
exactly what a JSON Schema validator accepts against the published OpenAPI schema (checked here with
``jsonschema`` against the live ``/openapi.json``), and still refuses 20.5, "20" and true.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from service_testlib import ADMIN_TOKEN, sample, scrape

from service.api.json_body import loads_unique
from service.errors import InvalidBody

JSON = {"content-type": "application/json"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", **JSON}


def _refused_for(r: httpx.Response, field: str) -> None:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["field"] == field
    assert err["message"].startswith(f"{field}: duplicated key"), err["message"]


# ---- E6: duplicated keys ----
@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ('{"k": 1000, "k": 2}', "k"),
        ('{"a": 1, "b": {"c": 1, "d": [1, {"e": 1, "e": 2}]}}', "b.d.1.e"),
        ('[{"x": 1}, {"x": 1, "y": 2, "x": 3}]', "1.x"),
        ('{"k": 1, "\\u006b": 2}', "k"),  # the same key once decoded: still one key twice
    ],
)
def test_the_first_duplicated_key_is_named_by_its_path(raw, path):
    with pytest.raises(InvalidBody) as refused:
        loads_unique(raw.encode())
    assert refused.value.field == path and refused.value.status_code == 422


def test_unique_keys_parse_as_json_does():
    raw = b'{"k": 1, "K": 2, "nested": {"k": [{"k": 1}, {"k": 2}]}, "s": "\\u00e9"}'
    assert loads_unique(raw) == json.loads(raw)
    with pytest.raises(json.JSONDecodeError):  # syntax errors stay what FastAPI answers as before
        loads_unique(b'{"k": 1,')


def test_recommend_refuses_a_duplicated_key_instead_of_keeping_the_last(server):
    before = sample(scrape(server.url), "fair_requests_rejected_total", reason="invalid")
    r = httpx.post(server.url + "/recommend", content=b'{"user_id": "1", "k": 1000, "k": 2}', headers=JSON)
    _refused_for(r, "k")
    # refused although the last value alone would be valid: it is the duplicate that is refused
    r = httpx.post(server.url + "/recommend", content=b'{"user_id": "1", "k": 2, "k": 3}', headers=JSON)
    _refused_for(r, "k")
    after = sample(scrape(server.url), "fair_requests_rejected_total", reason="invalid")
    assert after == before + 2


def test_a_duplicate_deep_inside_is_refused_before_the_model_is_validated(server):
    """history holds strings, so an object there is invalid anyway: the duplicate is named first."""
    body = b'{"user_id": "1", "history": ["a", {"x": 1, "x": 2}]}'
    _refused_for(httpx.post(server.url + "/recommend", content=body, headers=JSON), "history.1.x")


def test_events_and_admin_reload_refuse_duplicated_keys_too(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    body = f'{{"item_ids": ["{ids[0]}"], "item_ids": ["{ids[1]}"]}}'.encode()
    r = httpx.post(server.url + "/users/dup-user/events", content=body, headers=JSON)
    _refused_for(r, "item_ids")
    assert httpx.get(server.url + "/users/dup-user/history").json()["item_ids"] == []  # nothing stored
    r = httpx.post(server.url + "/admin/reload", content=b'{"version": 1, "version": 2}', headers=ADMIN)
    _refused_for(r, "version")


def test_bodies_with_unique_keys_are_served_as_before(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    r = httpx.post(server.url + "/recommend", json={"user_id": "1", "k": 3, "history": ids[:2]})
    assert r.status_code == 200 and len(r.json()["items"]) == 3


def test_every_route_with_a_json_body_refuses_duplicated_keys():
    """By construction: a route that takes a body and is not built by ``UniqueKeysRoute`` fails here
    (the admin item routes included, mounted by service.new_items.install)."""
    from fastapi.routing import APIRoute

    from service.api import admin, admin_items, recommend, users
    from service.api.json_body import UniqueKeysRoute

    with_body = [
        r
        for router in (recommend.router, users.router, admin.router, admin_items.router)
        for r in router.routes
        if isinstance(r, APIRoute) and r.body_field is not None
    ]
    assert {r.path for r in with_body} >= {
        "/recommend",
        "/users/{user_id}/events",
        "/admin/reload",
        "/admin/items",
    }
    assert all(isinstance(r, UniqueKeysRoute) for r in with_body), [
        r.path for r in with_body if not isinstance(r, UniqueKeysRoute)
    ]


# ---- E7: what type: integer accepts ----
def _schema(server, name: str) -> jsonschema.Draft202012Validator:
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")  # JSON Schema 2020-12 dialect
    schema = spec["components"]["schemas"][name]
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("k", 3, True),
        ("k", 3.0, True),
        ("k", 3.5, False),
        ("k", "3", False),
        ("k", True, False),
        ("k", 0.0, False),  # zero fraction, but under the minimum
        ("k", 101.0, False),
        ("beam_size", 10.0, True),
        ("beam_size", 10.5, False),
    ],
)
def test_recommend_accepts_exactly_what_its_published_schema_accepts(
    server, tiny_bundle, field, value, valid
):
    body = {"user_id": "1", "history": tiny_bundle.dataset.item_ids[:2], field: value}
    assert _schema(server, "RecommendRequest").is_valid(body) is valid  # what the schema says
    r = httpx.post(server.url + "/recommend", json=body)  # what the service does
    if valid:
        assert r.status_code == 200, r.text
        if field == "k":
            assert len(r.json()["items"]) == int(value)
    else:
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_reload_version_accepts_a_whole_number_written_as_a_float(server):
    assert _schema(server, "ReloadRequest").is_valid({"version": 1.0})
    r = httpx.post(server.url + "/admin/reload", json={"version": 1.0}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["pinned_version"] == 1
    for version in (1.5, "1", True):
        assert not _schema(server, "ReloadRequest").is_valid({"version": version})
        r = httpx.post(server.url + "/admin/reload", json={"version": version}, headers=ADMIN)
        assert r.status_code == 422 and r.json()["error"]["field"] == "version"

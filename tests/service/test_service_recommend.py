"""POST /recommend and the history routes against a live server, real Redis and a real bundle."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest
from service_testlib import HISTORY_MAX_ITEMS, MAX_HISTORY, sample, scrape

from model.evaluate.ranking import rank_items


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=10)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_top_k_equals_offline_ranking(server, tiny_bundle, exclude_seen):
    ds = tiny_bundle.dataset
    histories = ds.eval_split("test").histories[:6]
    want_items, want_scores = rank_items(
        tiny_bundle.model,
        tiny_bundle.table,
        tiny_bundle.trie,
        histories,
        beam_size=10,
        k=5,
        exclude_seen=exclude_seen,
        max_history=MAX_HISTORY,
    )
    for h, items, scores in zip(histories, want_items, want_scores, strict=True):
        body = {"user_id": new_user(), "k": 5, "beam_size": 10, "exclude_seen": exclude_seen}
        r = post(server, "/recommend", {**body, "history": [ds.item_ids[i] for i in h]})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["fallback"] is None and got["model_version"] == 1
        assert [it["item_id"] for it in got["items"]] == [ds.item_ids[i] for i in items if i >= 0]
        np.testing.assert_allclose([it["score"] for it in got["items"]], scores[items >= 0], atol=1e-4)
        assert [it["semantic_id"] for it in got["items"]] == tiny_bundle.table.codes[items].tolist()
        if exclude_seen:
            assert not set(h) & set(items.tolist())

        # the same history stored in Redis through the events route gives the same answer
        user = body["user_id"]
        r = post(server, f"/users/{user}/events", {"item_ids": [ds.item_ids[i] for i in h]})
        assert r.status_code == 200 and r.json()["history_length"] == len(h)
        r = post(server, "/recommend", body)
        assert r.status_code == 200
        assert [it["item_id"] for it in r.json()["items"]] == [ds.item_ids[i] for i in items if i >= 0]


def test_server_timing_names_every_stage(server, tiny_bundle):
    user = new_user()
    post(server, f"/users/{user}/events", {"item_ids": tiny_bundle.dataset.item_ids[:3]})
    r = post(server, "/recommend", {"user_id": user})
    assert r.status_code == 200
    stages = {part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")}
    assert stages == {"redis", "queue_wait", "inference", "beam_search", "total"}
    assert len(r.json()["items"]) == 10


def test_unknown_user_gets_popular_fallback(server, tiny_bundle):
    before = scrape(server.url)
    r = post(server, "/recommend", {"user_id": new_user(), "k": 7})
    assert r.status_code == 200
    got = r.json()
    assert got["fallback"] == "popular"
    assert [it["item_id"] for it in got["items"]] == [
        tiny_bundle.table.item_ids[i] for i in tiny_bundle.popular[:7]
    ]
    assert all(it["score"] is None for it in got["items"])
    after = scrape(server.url)
    assert (
        sample(after, "fair_fallback_total", reason="unknown_user")
        == sample(before, "fair_fallback_total", reason="unknown_user") + 1
    )


def test_unknown_items_are_skipped_and_counted(server, tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    clean = post(server, "/recommend", {"user_id": "a", "history": ids[4:8]}).json()
    before = scrape(server.url)
    mixed = post(
        server, "/recommend", {"user_id": "a", "history": ["nope-1", *ids[4:6], "nope-2", *ids[6:8]]}
    )
    assert mixed.status_code == 200
    assert mixed.json()["items"] == clean["items"]
    after = scrape(server.url)
    assert sample(after, "fair_unknown_items_total") == sample(before, "fair_unknown_items_total") + 2

    # nothing known at all: the popular fallback, for its own reason, minus nothing (no seen items)
    r = post(server, "/recommend", {"user_id": "a", "history": ["nope-3"], "k": 3})
    assert r.json()["fallback"] == "popular"
    assert sample(scrape(server.url), "fair_fallback_total", reason="no_known_items") >= 1


def test_exclude_seen_never_returns_history_items(server, tiny_bundle):
    seen = [tiny_bundle.table.item_ids[i] for i in tiny_bundle.popular[:8]]
    r = post(server, "/recommend", {"user_id": "b", "history": seen, "k": 50})
    got = [it["item_id"] for it in r.json()["items"]]
    assert len(got) == 50 and len(set(got)) == 50 and not set(got) & set(seen)


def test_events_append_trim_and_history(server, tiny_bundle):
    user = new_user()
    ids = tiny_bundle.dataset.item_ids
    r = httpx.get(f"{server.url}/users/{user}/history")
    assert r.status_code == 200 and r.json() == {"user_id": user, "item_ids": []}
    assert post(server, f"/users/{user}/events", {"item_ids": ids[:5]}).json()["history_length"] == 5
    r = post(server, f"/users/{user}/events", {"item_ids": ids[5:20]})
    assert r.json() == {"user_id": user, "history_length": HISTORY_MAX_ITEMS}
    stored = httpx.get(f"{server.url}/users/{user}/history").json()["item_ids"]
    assert stored == ids[:20][-HISTORY_MAX_ITEMS:]  # newest last, oldest trimmed


def test_model_and_health_routes(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "checks": {"model": True, "redis": True}}
    m = httpx.get(server.url + "/model").json()
    assert (m["name"], m["version"], m["provider"]) == ("tiny", 1, "CPUExecutionProvider")
    assert "files" not in m["manifest"] and m["manifest"]["max_history"] == MAX_HISTORY

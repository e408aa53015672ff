"""Request defaults come from the settings: FAIR_DEFAULT_K applies to a /recommend body without k."""

from __future__ import annotations

import httpx
from service_testlib import LiveServer, make_settings


def test_default_k_setting_applies_when_k_is_omitted(tiny_bundle, redis_settings):
    ids = tiny_bundle.dataset.item_ids
    with LiveServer(make_settings(tiny_bundle, redis_settings, default_k=3)) as live:
        for body in ({"user_id": "dk", "history": ids[:4]}, {"user_id": "dk-unknown-user"}):
            r = httpx.post(f"{live.url}/recommend", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 3  # model answer and popular fallback alike
        r = httpx.post(f"{live.url}/recommend", json={"user_id": "dk", "history": ids[:4], "k": 5})
        assert len(r.json()["items"]) == 5  # an explicit k still wins

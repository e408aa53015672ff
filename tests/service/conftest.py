"""Fixtures of the service tests (helpers live in service_testlib.py)."""

from __future__ import annotations

import os
import uuid

import pytest
from service_testlib import HISTORY_MAX_ITEMS, LiveServer, TinyBundle, build_tiny_bundle, make_settings


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> TinyBundle:
    return build_tiny_bundle(tmp_path_factory.mktemp("service-bundle"))


@pytest.fixture(scope="session")
def redis_settings(tmp_path_factory) -> dict:
    """Redis part of the settings: FAIR_TEST_REDIS_URL when set, else embedded in a temp dir."""
    url = os.environ.get("FAIR_TEST_REDIS_URL")
    if url:
        cluster = os.environ.get("FAIR_TEST_REDIS_CLUSTER", "").lower() in ("1", "true", "yes")
        run = uuid.uuid4().hex[:8]
        return {
            "redis_url": url,
            "redis_cluster": cluster,
            "history_key_prefix": f"fair:test:{run}:",
            "idempotency_key_prefix": f"fair:test-idem:{run}:",  # its own prefix, as the service's
        }
    return {"data_dir": tmp_path_factory.mktemp("redis")}


@pytest.fixture(scope="module")
def server(tiny_bundle, redis_settings):
    """One shared server per test module, pinned to version 1 so reload tests start from a known state."""
    settings = make_settings(
        tiny_bundle, redis_settings, bundle=tiny_bundle.model_dir / "1", history_max_items=HISTORY_MAX_ITEMS
    )
    with LiveServer(settings) as live:
        yield live

"""Failure handling with real components: Redis stopped and restarted, broken bundles, bundle polling.

The Redis test always runs its own embedded server (even with FAIR_TEST_REDIS_URL set): a test can
only stop a server it owns.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from service_testlib import ADMIN_TOKEN, LiveServer, make_settings, sample, scrape

from service.embedded_redis import EmbeddedRedis


def test_redis_down_gives_503_then_recovers_without_restart(tiny_bundle):
    ids = tiny_bundle.dataset.item_ids
    with tempfile.TemporaryDirectory(prefix="fair-rd-") as data_dir:
        redis_server = EmbeddedRedis(data_dir).start()
        try:
            settings = make_settings(tiny_bundle, {"redis_url": redis_server.url}, redis_timeout_ms=100)
            with LiveServer(settings) as live:
                url = live.url
                assert httpx.post(f"{url}/users/alice/events", json={"item_ids": ids[:4]}).status_code == 200
                assert httpx.get(f"{url}/readyz").status_code == 200

                redis_server.stop()
                r = httpx.post(f"{url}/recommend", json={"user_id": "alice"})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "redis_unavailable"
                assert httpx.post(f"{url}/users/alice/events", json={"item_ids": ids[:1]}).status_code == 503
                ready = httpx.get(f"{url}/readyz")
                assert ready.status_code == 503 and ready.json()["checks"] == {"model": True, "redis": False}
                # a request that brings its own history does not need Redis
                r = httpx.post(f"{url}/recommend", json={"user_id": "alice", "history": ids[:4]})
                assert r.status_code == 200

                redis_server.start()  # same socket, same data directory
                deadline = time.monotonic() + 10
                while httpx.get(f"{url}/readyz").status_code != 200:
                    assert time.monotonic() < deadline, "service did not recover"
                    time.sleep(0.05)
                r = httpx.post(f"{url}/recommend", json={"user_id": "alice"})
                assert r.status_code == 200 and r.json()["fallback"] is None  # history survived the restart
                assert httpx.get(f"{url}/users/alice/history").json()["item_ids"] == ids[:4]
        finally:
            redis_server.stop()


def _copy_versions(tiny_bundle, dest: Path, versions) -> Path:
    model_dir = dest / "tiny"
    model_dir.mkdir(parents=True)
    for v in versions:
        shutil.copytree(tiny_bundle.model_dir / str(v), model_dir / str(v))
    return model_dir


def test_broken_bundle_keeps_the_old_model(tiny_bundle, redis_settings, tmp_path):
    model_dir = _copy_versions(tiny_bundle, tmp_path, [1])
    broken = shutil.copytree(model_dir / "1", model_dir / "2")
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))  # a real version 2 ...
    np.save(broken / "popular.npy", np.arange(3, dtype=np.int64))  # ... whose checksum no longer matches
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=model_dir / "1")) as live:
        r = httpx.post(f"{live.url}/admin/reload", json={"version": 2}, headers=auth)
        assert r.status_code == 409
        err = r.json()["error"]
        assert err["code"] == "reload_failed" and "popular.npy" in err["message"]
        assert httpx.get(f"{live.url}/model").json()["version"] == 1
        r = httpx.post(
            f"{live.url}/recommend", json={"user_id": "x", "history": tiny_bundle.dataset.item_ids[:2]}
        )
        assert r.status_code == 200 and r.json()["model_version"] == 1


def test_poll_picks_up_a_new_version(tiny_bundle, redis_settings, tmp_path):
    model_dir = _copy_versions(tiny_bundle, tmp_path, [1])
    settings = make_settings(tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05)
    with LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/model").json()["version"] == 1
        staging = tmp_path / "staging"
        shutil.copytree(tiny_bundle.model_dir / "2", staging)
        staging.rename(model_dir / "2")  # appear atomically, as fair-export does
        deadline = time.monotonic() + 10
        while httpx.get(f"{live.url}/model").json()["version"] != 2:
            assert time.monotonic() < deadline, "new version not picked up"
            time.sleep(0.05)


def test_no_bundle_means_not_ready_and_503(tiny_bundle, redis_settings):
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=None)) as live:
        r = httpx.post(f"{live.url}/recommend", json={"user_id": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_model" and "retry-after" in r.headers
        assert httpx.get(f"{live.url}/readyz").json() == {
            "ready": False,
            "checks": {"model": False, "redis": True},
        }


def test_poll_survives_a_failing_bundle_root(tiny_bundle, redis_settings, tmp_path, monkeypatch):
    """A transient error listing the bundle root (NFS/FUSE mounts hiccup) must not end polling for good."""
    import service.state

    model_dir = _copy_versions(tiny_bundle, tmp_path, [1])
    real_list_versions = service.state.list_versions
    failures = []

    def flaky_list_versions(path):
        if len(failures) < 2:
            failures.append(path)
            raise OSError(116, "Stale file handle", str(path))
        return real_list_versions(path)

    settings = make_settings(tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05)
    with LiveServer(settings) as live:
        monkeypatch.setattr(service.state, "list_versions", flaky_list_versions)
        shutil.copytree(tiny_bundle.model_dir / "2", tmp_path / "staging")
        (tmp_path / "staging").rename(model_dir / "2")
        deadline = time.monotonic() + 10
        while httpx.get(f"{live.url}/model").json()["version"] != 2:
            assert time.monotonic() < deadline, "polling stopped after a bundle-root error"
            time.sleep(0.05)
        assert failures


def test_poll_tries_a_copied_bundle_once_and_keeps_serving(
    tiny_bundle, redis_settings, tmp_path, monkeypatch
):
    """A version directory whose manifest names another version (`cp -a 1 3`) is refused once and
    never retried: it used to be served as version 1 and reloaded on every poll."""
    import service.state

    model_dir = _copy_versions(tiny_bundle, tmp_path, [1])
    real_reload = service.state.reload_model
    attempts = []

    async def counting_reload(state, version=None):
        attempts.append(version)
        return await real_reload(state, version)

    settings = make_settings(tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05)
    with LiveServer(settings) as live:
        monkeypatch.setattr(service.state, "reload_model", counting_reload)
        shutil.copytree(model_dir / "1", tmp_path / "staging")
        (tmp_path / "staging").rename(model_dir / "3")
        time.sleep(1.0)  # ~20 polls
        assert attempts == [3]
        info = httpx.get(f"{live.url}/model").json()
        assert info["version"] == 1
        r = httpx.post(
            f"{live.url}/recommend", json={"user_id": "x", "history": tiny_bundle.dataset.item_ids[:2]}
        )
        assert r.status_code == 200 and r.json()["model_version"] == 1


def test_a_manual_rollback_pins_the_version_until_released(tiny_bundle, redis_settings, tmp_path):
    """The poller used to undo a rollback: after POST /admin/reload {"version": 1} the next poll saw 2 > 1."""
    model_dir = _copy_versions(tiny_bundle, tmp_path, [1, 2])
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    settings = make_settings(tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05)
    with LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/model").json()["version"] == 2
        r = httpx.post(f"{live.url}/admin/reload", json={"version": 1}, headers=auth)
        assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["pinned_version"] == 1
        time.sleep(1.0)  # ~20 polls, each of which would have reloaded version 2
        assert httpx.get(f"{live.url}/model").json()["version"] == 1
        assert httpx.get(f"{live.url}/admin/model", headers=auth).json()["pinned_version"] == 1
        assert sample(scrape(live.url), "fair_bundle_manual_pin") == 1
        # a reload without a version loads the newest and releases the pin: polling resumes
        r = httpx.post(f"{live.url}/admin/reload", headers=auth)
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["pinned_version"] is None
        assert httpx.get(f"{live.url}/admin/model", headers=auth).json()["pinned_version"] is None
        assert sample(scrape(live.url), "fair_bundle_manual_pin") == 0
        staging = tmp_path / "staging"
        shutil.copytree(model_dir / "2", staging)
        manifest = json.loads((staging / "manifest.json").read_text())
        # version 3 = version 2's files under a new number; its manifest checksum list is unchanged
        (staging / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
        staging.rename(model_dir / "3")
        deadline = time.monotonic() + 10
        while httpx.get(f"{live.url}/model").json()["version"] != 3:
            assert time.monotonic() < deadline, "polling did not resume after the pin was released"
            time.sleep(0.05)


def test_a_failed_pinned_reload_keeps_the_previous_pin_state(tiny_bundle, redis_settings, tmp_path):
    model_dir = _copy_versions(tiny_bundle, tmp_path, [1, 2])
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=model_dir)) as live:
        assert httpx.post(f"{live.url}/admin/reload", json={"version": 7}, headers=auth).status_code == 404
        assert httpx.get(f"{live.url}/admin/model", headers=auth).json()["pinned_version"] is None

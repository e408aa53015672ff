"""What the service loads (issue 24.2): signed bundles only when a key is configured, the newest version
that loads at startup (one bad version no longer crash-loops every pod), and no model.onnx that reads
files outside its bundle (the onnxruntime floor).

Each test fails on the code before the fix: startup loaded the newest version or died, any bundle was
served without a key to check, and onnxruntime 1.19 read external data from anywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY
from pydantic import ValidationError
from service_testlib import ADMIN_TOKEN, LiveServer, make_settings, sample, scrape

from export.bundle import (
    BundleChecksumError,
    BundleError,
    sha256_file,
    sign_bundle,
)
from service.engine import load_engine
from service.settings import Settings
from service.state import AppState, load_at_startup

KEY = "service-test-signing-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _version(tiny_bundle, model_dir: Path, v: int, *, sign: bool = False, **manifest_changes) -> Path:
    """Version ``v`` under ``model_dir``: a copy of the tiny bundle's version 1 whose manifest says ``v``
    (+ ``manifest_changes``), renamed into place at once as fair-export does; signed when asked."""
    staging = model_dir.parent / f".staging-{model_dir.name}-{v}"
    shutil.copytree(tiny_bundle.model_dir / "1", staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    (staging / "manifest.json").write_text(json.dumps({**manifest, "version": v, **manifest_changes}))
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / str(v)
    staging.rename(path)
    if sign:
        sign_bundle(path, KEY.encode())
    return path


def _broken_checksum(path: Path) -> Path:
    np.save(path / "popular.npy", np.arange(3, dtype=np.int64))  # the manifest's sha256 no longer matches
    return path


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("fair_bundles_refused_total", {"reason": reason}) or 0.0


def _wait_for(check, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def test_startup_falls_back_to_the_newest_version_that_loads(tiny_bundle, redis_settings, tmp_path, caplog):
    model_dir = tmp_path / "tiny"
    _version(tiny_bundle, model_dir, 1)
    _broken_checksum(_version(tiny_bundle, model_dir, 2))
    _version(tiny_bundle, model_dir, 3, max_history=10**9)  # over its cap: refused before any allocation
    before = {reason: _refused(reason) for reason in ("checksum", "limit")}
    settings = make_settings(tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05)
    with caplog.at_level(logging.WARNING, logger="fair"), LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/model").json()["version"] == 1
        r = httpx.post(
            f"{live.url}/recommend", json={"user_id": "u", "history": tiny_bundle.dataset.item_ids[:2]}
        )
        assert r.status_code == 200 and r.json()["model_version"] == 1
        # /healthz stays 200 (a restart would not help) and says a fallback happened, without reasons
        # (they name file paths; public answers never do)
        health = httpx.get(f"{live.url}/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok", "fallback_from": [3, 2]}
        admin = httpx.get(f"{live.url}/admin/model", headers=AUTH).json()
        assert [(f["version"], f["reason"]) for f in admin["fallback_from"]] == [
            (3, "limit"),
            (2, "checksum"),
        ]
        assert "max_history = 1000000000 is outside [1, 4096]" in admin["fallback_from"][0]["message"]
        assert "popular.npy" in admin["fallback_from"][1]["message"]
        metrics = scrape(live.url)
        for reason, value in before.items():
            assert sample(metrics, "fair_bundles_refused_total", reason=reason) == value + 1
        # the poller does not retry them, and a newer version that loads ends the fallback
        _version(tiny_bundle, model_dir, 4)
        _wait_for(lambda: httpx.get(f"{live.url}/model").json()["version"] == 4, "version 4")
        assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{live.url}/admin/model", headers=AUTH).json()["fallback_from"] == []
        assert _refused("checksum") == before["checksum"] + 1  # version 2 was tried once
    messages = [r.getMessage() for r in caplog.records]
    assert any("startup: serving tiny v1, an older version: newer version(s) 3, 2" in m for m in messages)
    assert any("bundles are not authenticated: FAIR_BUNDLE_SIGNING_KEY is unset" in m for m in messages)


def test_startup_fails_only_when_no_version_loads_and_a_pinned_version_never_falls_back(
    tiny_bundle, redis_settings, tmp_path
):
    model_dir = tmp_path / "tiny"
    _broken_checksum(_version(tiny_bundle, model_dir, 1))
    _version(tiny_bundle, model_dir, 2, code_length=10**6)
    state = AppState.from_settings(make_settings(tiny_bundle, redis_settings, bundle=model_dir))
    with pytest.raises(BundleError, match=r"no version loads: v2: BundleLimitError: .*code_length.*; v1: "):
        load_at_startup(state)
    _version(tiny_bundle, model_dir, 3)
    pinned = AppState.from_settings(make_settings(tiny_bundle, redis_settings, bundle=model_dir / "1"))
    with pytest.raises(BundleChecksumError, match="popular.npy"):  # a pin means that version
        load_at_startup(pinned)


def test_with_a_signing_key_only_signed_bundles_are_served(tiny_bundle, redis_settings, tmp_path, caplog):
    model_dir = tmp_path / "tiny"
    _version(tiny_bundle, model_dir, 1, sign=True)
    _version(tiny_bundle, model_dir, 2)  # written without the key
    settings = make_settings(
        tiny_bundle, redis_settings, bundle=model_dir, bundle_poll_s=0.05, bundle_signing_key=KEY
    )
    with caplog.at_level(logging.WARNING, logger="fair"), LiveServer(settings) as live:
        assert httpx.get(f"{live.url}/model").json()["version"] == 1
        assert httpx.get(f"{live.url}/healthz").json()["fallback_from"] == [2]
        refused = httpx.get(f"{live.url}/admin/model", headers=AUTH).json()["fallback_from"]
        assert refused[0]["reason"] == "signature" and "not signed" in refused[0]["message"]
        r = httpx.post(f"{live.url}/admin/reload", json={"version": 2}, headers=AUTH)
        assert r.status_code == 409 and "BundleSignatureError" in r.json()["error"]["message"]

        sign_bundle(model_dir / "2", KEY.encode())  # the operator signs it: it loads
        r = httpx.post(f"{live.url}/admin/reload", json={}, headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == 2
        assert httpx.get(f"{live.url}/healthz").json() == {"status": "ok"}

        # a signed version whose manifest someone rewrote (its own checksums kept consistent) is refused
        forged = _version(tiny_bundle, tmp_path / "work", 3, sign=False)
        np.save(forged / "popular.npy", np.arange(3, dtype=np.int64))
        manifest = json.loads((forged / "manifest.json").read_text())
        manifest["files"]["popular.npy"] = sha256_file(forged / "popular.npy")
        (forged / "manifest.json").write_text(json.dumps(manifest))
        shutil.copyfile(
            model_dir / "2" / "manifest.sig", forged / "manifest.sig"
        )  # a signature of other bytes
        forged.rename(model_dir / "3")
        _wait_for(lambda: httpx.get(f"{live.url}/healthz").json().get("fallback_from") == [3], "v3 refused")
        assert httpx.get(f"{live.url}/model").json()["version"] == 2
    assert not any("not authenticated" in r.getMessage() for r in caplog.records)


def test_the_signing_key_comes_from_the_environment_and_is_never_echoed(monkeypatch):
    other = "another-signing-key-for-rotation-0000"
    monkeypatch.setenv("FAIR_BUNDLE_SIGNING_KEY", f"{KEY},{other}")
    settings = Settings()
    assert settings.signing_keys == [KEY.encode(), other.encode()]
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump())
    monkeypatch.setenv("FAIR_BUNDLE_SIGNING_KEY", "too-short-a-key")
    with pytest.raises(ValidationError, match="at least 32 characters") as err:
        Settings()
    assert "too-short-a-key" not in str(err.value)
    monkeypatch.setenv("FAIR_BUNDLE_SIGNING_KEY", KEY)
    monkeypatch.setenv("FAIR_VERIFY_BUNDLE", "false")
    with pytest.raises(ValidationError, match="needs FAIR_VERIFY_BUNDLE=true"):
        Settings()
    monkeypatch.setenv("FAIR_BUNDLE_SIGNING_KEY", "")  # set but empty: no key
    monkeypatch.delenv("FAIR_VERIFY_BUNDLE")
    assert Settings().signing_keys == []


def _external_data_model(path: Path, location: str, sparse: bool) -> None:
    """A graph whose one constant is read from ``location`` (relative to the model's directory)."""
    values = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        values.external_data.add(key=key, value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if sparse:
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "i")
        nodes = [
            helper.make_node(
                "Constant", [], ["w"], sparse_value=helper.make_sparse_tensor(values, indices, [4])
            ),
            helper.make_node("Add", ["x", "w"], ["y"]),
        ]
        graph = helper.make_graph(nodes, "g", [x], [y])
    else:
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [values])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))  # keeps the external reference as it is (nothing is loaded)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_model_reading_a_file_outside_its_bundle_is_refused(tiny_bundle, tmp_path, sparse):
    """onnxruntime before 1.27 read an initializer's external data from any path the graph named
    (`../`, absolute, through a symlink; sparse constants until 1.27): a bundle could serve the bytes of
    any file the pod may read. The pyproject floor is the release that refuses it."""
    model_dir = tmp_path / "tiny"
    path = _version(tiny_bundle, model_dir, 1)
    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    _external_data_model(path / "model.onnx", "../../secret.bin", sparse)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(path / "model.onnx")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="External data path") as err:
        load_engine(model_dir, providers=["CPUExecutionProvider"])
    assert "escapes" in str(err.value)


def test_fair_serve_has_no_flag_for_the_signing_key():
    """Every setting is also a fair-serve flag, but a key on a command line is visible to every user of
    the machine (ps): the signing key is environment-only, like the tokens."""
    from service.cli import build_parser

    flags = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert "--bundle-signing-key" not in flags and "--bundle" in flags
    assert "FAIR_BUNDLE_SIGNING_KEY" in build_parser().description

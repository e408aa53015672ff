"""A bundle exported with ``--search ann`` served end to end: live server, real Redis, the bundle's faiss
index loaded after its checksum, the same ranking as offline."""

from __future__ import annotations

import uuid

import faiss
import httpx
import numpy as np
import pytest
from service_testlib import MAX_HISTORY, LiveServer, make_settings

from export.bundle import load_bundle
from export.cli import main as export_main
from model.evaluate.ranking import rank_items
from model.search.modes.ann import AnnMode


@pytest.fixture(scope="module")
def ann_server(tiny_bundle, redis_settings, tmp_path_factory):
    """The tiny run exported again with --search ann (120 items: 3 lists, all probed at nprobe 3)."""
    run = tiny_bundle.model_dir.parent.parent / "run"
    root = tmp_path_factory.mktemp("ann-bundles")
    argv = ["--run", str(run), "--out", str(root), "--name", "ann", "--users", "32", "--search", "ann"]
    assert export_main([*argv, "--nprobe", "3"]) == 0
    settings = make_settings(tiny_bundle, redis_settings, bundle=root / "ann")
    with LiveServer(settings) as live:
        yield live, root / "ann" / "1"


def test_an_ann_bundle_is_served_with_the_offline_ranking(ann_server, tiny_bundle):
    server, bundle_dir = ann_server
    bundle = load_bundle(bundle_dir)
    assert bundle.search == AnnMode(candidates=200, nprobe=3)
    assert server.state.engine.bundle.search == bundle.search
    assert faiss.omp_get_max_threads() == 1  # the service's one search thread: faiss's pool too
    ds = tiny_bundle.dataset
    histories = ds.eval_split("test").histories[:6]
    want_items, want_scores = rank_items(
        tiny_bundle.model, tiny_bundle.table, tiny_bundle.trie, histories, k=5, max_history=MAX_HISTORY
    )  # PyTorch's exact ranking: every list probed, ann returns exactly it
    for h, items, scores in zip(histories, want_items, want_scores, strict=True):
        body = {"user_id": f"user-{uuid.uuid4().hex[:10]}", "k": 5, "exclude_seen": True}
        r = httpx.post(
            server.url + "/recommend", json={**body, "history": [ds.item_ids[i] for i in h]}, timeout=10
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["fallback"] is None
        assert [it["item_id"] for it in got["items"]] == [ds.item_ids[i] for i in items if i >= 0]
        np.testing.assert_allclose([it["score"] for it in got["items"]], scores[items >= 0], atol=1e-4)

"""Bundle schemas side by side: the shared server's bundle is schema 4 (item input vectors gathered
from item_inputs.npy, no catalog-sized tensor in the graph) and a schema 3 bundle (written by the old
path: the graph takes item indices and holds the ID tables) is still served, both with PyTorch's
ranking."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import onnx
import pytest
from service_testlib import MAX_HISTORY, LiveServer, make_settings

from export.bundle import load_bundle
from export.exporter import export_bundle, load_sources
from model.evaluate.ranking import rank_items
from model.search.inputs import ITEM_INDEX_INPUTS, ITEM_VECTOR_INPUTS


@pytest.fixture(scope="module")
def schema3_server(tiny_bundle, redis_settings, tmp_path_factory):
    """The tiny run exported as a schema 3 bundle (the layout fair-export wrote before schema 4)."""
    run = tiny_bundle.model_dir.parent.parent / "run"
    root = tmp_path_factory.mktemp("schema3-bundles")
    export_bundle(load_sources(run=run), root, name="old", users=32, schema=3)
    settings = make_settings(tiny_bundle, redis_settings, bundle=root / "old")
    with LiveServer(settings) as live:
        yield live, root / "old" / "1"


def _served_equals_offline(server, tiny_bundle, version: int) -> None:
    ds = tiny_bundle.dataset
    histories = ds.eval_split("test").histories[:6]
    want_items, want_scores = rank_items(
        tiny_bundle.model, tiny_bundle.table, tiny_bundle.trie, histories, k=5, max_history=MAX_HISTORY
    )
    for h, items, scores in zip(histories, want_items, want_scores, strict=True):
        body = {"user_id": f"user-{uuid.uuid4().hex[:10]}", "k": 5, "exclude_seen": True}
        r = httpx.post(
            server.url + "/recommend", json={**body, "history": [ds.item_ids[i] for i in h]}, timeout=10
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["fallback"] is None and got["model_version"] == version
        assert [it["item_id"] for it in got["items"]] == [ds.item_ids[i] for i in items if i >= 0]
        np.testing.assert_allclose([it["score"] for it in got["items"]], scores[items >= 0], atol=1e-4)


def test_a_schema_3_bundle_is_still_served_with_the_offline_ranking(schema3_server, tiny_bundle):
    server, bundle_dir = schema3_server
    bundle = load_bundle(bundle_dir)
    assert bundle.schema_version == 3 and bundle.input_names == ITEM_INDEX_INPUTS
    assert bundle.item_inputs is None and "item_inputs.npy" not in bundle.manifest["files"]
    graph = onnx.load(str(bundle.model_path)).graph
    assert [i.name for i in graph.input] == list(ITEM_INDEX_INPUTS)
    n = bundle.table.num_items  # the old graph holds the [I, D] ID table itself
    assert any(t.dims[:1] == [n] for t in graph.initializer)
    engine = server.state.engine
    assert engine.bundle.schema_version == 3 and engine.bundle.input_names == ITEM_INDEX_INPUTS
    _served_equals_offline(server, tiny_bundle, version=1)


def test_the_schema_4_bundle_is_served_with_the_offline_ranking(server, tiny_bundle):
    engine = server.state.engine
    assert engine.bundle.schema_version == 4 and engine.bundle.input_names == ITEM_VECTOR_INPUTS
    assert engine.bundle.item_inputs is not None
    assert [i.name for i in engine.session.get_inputs()] == list(ITEM_VECTOR_INPUTS)
    graph = onnx.load(str(engine.bundle.model_path)).graph
    assert not any(engine.bundle.table.num_items in t.dims for t in graph.initializer)
    _served_equals_offline(server, tiny_bundle, version=1)

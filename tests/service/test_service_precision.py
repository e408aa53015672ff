"""int8 and fp16 bundles served: exported by ``fair-export --quantize int8`` / ``--fp16`` (with ``--data``,
so each manifest records its own offline metrics), loaded by the service, and held against the fp32
bundle of the same run: the served top-10 overlaps fp32's, the served Recall/NDCG stays within a bound
of fp32's, and it is what the bundle's manifest promised.

The fp32 reference is the session's bundle (tests/service/conftest.py), exported from the same seed-0
tiny run; the test checks it is the same network before comparing.
"""

from __future__ import annotations

import httpx
import numpy as np
import onnx
import pytest
from served_rankings import (
    K,
    export,
    overlap_at_k,
    served_metrics,
    served_top_k,
    split_users,
    tiny_run_with_data,
)
from service_testlib import LiveServer, make_settings

from export.bundle import load_bundle

# Bounds against fp32 over the 60 test users. Measured on this tiny run: int8 keeps every top-10 set
# (95% in the same order), fp16 keeps every list; the metrics are equal. The bounds leave room for a
# few users' lists to change (one user's hit moves Recall@10 by 1/60), not for a broken bundle.
BOUNDS = {
    "int8": {"overlap": 0.90, "metric": 2 / 60},
    "fp16": {"overlap": 0.98, "metric": 1 / 60},
}
METRICS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_with_data(tmp_path_factory.mktemp("precision"))


@pytest.fixture(scope="module")
def fp32_ranked(tiny, tiny_bundle, redis_settings):
    histories, _ = split_users(tiny.dataset)
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=tiny_bundle.model_dir / "1")) as live:
        assert live.state.engine.bundle.precision == "fp32"
        return served_top_k(live.url, tiny.dataset, histories)


@pytest.fixture(scope="module", params=["int8", "fp16"])
def served(request, tiny, tiny_bundle, redis_settings):
    """(precision, the exported bundle, the served top-10 of every test user)."""
    precision = request.param
    bundle = export(tiny, precision, *(["--quantize", "int8"] if precision == "int8" else ["--fp16"]))
    reference = tiny_bundle.model_dir / "1"
    with LiveServer(make_settings(tiny_bundle, redis_settings, bundle=bundle.dir)) as live:
        public = httpx.get(f"{live.url}/model").json()
        assert public["manifest"]["precision"] == precision and public["version"] == 1
        engine = live.state.engine
        assert engine.bundle.precision == precision and engine.bundle.dir == bundle.dir
        # the same network as the fp32 reference: same catalog, same (fp32) item tables
        fp32 = load_bundle(reference)
        assert fp32.manifest["sid_sha256"] == bundle.manifest["sid_sha256"]
        np.testing.assert_array_equal(fp32.item_inputs, bundle.item_inputs)
        histories, _ = split_users(tiny.dataset)
        return precision, bundle, served_top_k(live.url, tiny.dataset, histories)


def test_the_graph_is_the_precision_the_manifest_names(served):
    precision, bundle, _ = served
    graph = onnx.load(str(bundle.model_path)).graph
    ops = {n.op_type for n in graph.node}
    weights = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in graph.initializer}
    if precision == "int8":
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
        assert np.dtype(np.int8) in weights
    else:
        assert np.dtype(np.float16) in weights
    # the I/O contract is the fp32 one whatever the precision (the service does not care)
    assert [o.name for o in graph.output] == ["history"]
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_the_served_top_k_overlaps_fp32(served, fp32_ranked):
    precision, _, ranked = served
    assert ranked.shape == fp32_ranked.shape == (60, K) and (ranked >= 0).all()
    overlap = overlap_at_k(ranked, fp32_ranked)
    assert overlap >= BOUNDS[precision]["overlap"], (precision, overlap)


def test_served_metrics_stay_within_the_bound_of_fp32_and_match_the_manifest(served, fp32_ranked, tiny):
    precision, bundle, ranked = served
    _, targets = split_users(tiny.dataset)
    got, fp32 = served_metrics(ranked, targets), served_metrics(fp32_ranked, targets)
    for name in METRICS:
        assert abs(got[name] - fp32[name]) <= BOUNDS[precision]["metric"] + 1e-12, (name, got, fp32)
    # what fair-export measured offline for this bundle is what the service delivers; int8's dynamic
    # quantization scales activations per batch (the export ranks all users in one batch, the service
    # one request at a time here), so its rankings may differ by a user or two
    offline = bundle.manifest["metrics"]["bundle"]
    assert offline["precision"] == precision and offline["users"] == 60 and offline["invalid_rate"] == 0.0
    tolerance = 1e-9 if precision == "fp16" else BOUNDS["int8"]["metric"]
    for name in METRICS:
        assert abs(offline[name] - got[name]) <= tolerance, (name, offline, got)

"""export.onnx_export: the schema 4 graph holds no catalog-sized tensor, so its size does not grow with
the catalog (the ID lookup is the runtime's gather from item_inputs.npy)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_export import TINY_CONFIG

from export.onnx_export import (
    ExportError,
    export_onnx,
    graph_input_names,
    io_spec,
    item_input_table,
    next_item_history,
)
from model.fair import FAIR, FAIRConfig
from model.search.inputs import (
    CODE_INPUTS,
    ITEM_INDEX_INPUTS,
    ITEM_VECTOR_INPUTS,
    graph_feeds,
    histories_to_inputs,
)


def _text_model(num_items: int) -> FAIR:
    """The tiny network with every catalog-sized part: ID table, trained flags and item text."""
    torch.manual_seed(0)
    model = FAIR(FAIRConfig(**{**TINY_CONFIG, "num_items": num_items, "item_text": True, "text_dim": 8}))
    with torch.no_grad():
        model.item_trained[::7] = False
        model.item_text.normal_()
    return model.eval()


def test_the_graph_holds_no_catalog_sized_tensor_and_does_not_grow_with_the_catalog(tmp_path):
    sizes = {}
    for n in (50, 5000):
        model = _text_model(n)
        path = export_onnx(model, tmp_path / f"model{n}.onnx")
        proto = onnx.load(str(path))
        assert [i.name for i in proto.graph.input] == list(ITEM_VECTOR_INPUTS)
        catalog_sized = [(t.name, list(t.dims)) for t in proto.graph.initializer if n in t.dims]
        assert catalog_sized == []
        sizes[n] = path.stat().st_size
        # and it computes PyTorch's history (from the item indices) on the gathered item inputs
        rng = np.random.default_rng(1)
        histories = [rng.choice(n, size=int(rng.integers(1, 10)), replace=False) for _ in range(5)]
        codes = np.random.default_rng(2).integers(
            0, TINY_CONFIG["codebook_size"], (n, TINY_CONFIG["num_levels"])
        )
        inputs = histories_to_inputs(histories, codes, max_history=9)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, graph_feeds(inputs, ITEM_VECTOR_INPUTS, item_input_table(model)))
        with torch.no_grad():
            want = next_item_history(model, *(torch.from_numpy(a) for a in inputs)).numpy()
        assert np.abs(got - want).max() <= 1e-4
    # before schema 4: 112,285 vs 592,447 bytes (the [I, D] table, the trained flags, the [I, 8] text)
    assert abs(sizes[5000] - sizes[50]) <= 0.01 * sizes[50], sizes


def test_item_input_table_is_the_id_vectors_in_chunks():
    model = _text_model(50)
    with torch.no_grad():
        want = model.id_vectors().numpy()
    got = item_input_table(model, chunk=7)
    assert got.dtype == np.float32 and got.shape == (50, TINY_CONFIG["d_model"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert item_input_table(FAIR(FAIRConfig(**{**TINY_CONFIG, "item_ids": False}))) is None


def test_graph_inputs_per_schema_and_model():
    ids = FAIRConfig(**TINY_CONFIG)
    codes_only = FAIRConfig(**{**TINY_CONFIG, "item_ids": False})
    assert graph_input_names(ids) == ITEM_VECTOR_INPUTS
    assert graph_input_names(codes_only) == CODE_INPUTS
    assert graph_input_names(ids, schema=3) == graph_input_names(codes_only, schema=3) == ITEM_INDEX_INPUTS
    inputs, _ = io_spec(ids)
    assert inputs[1] == {"name": "item_inputs", "dtype": "float32", "shape": ["batch", "items", 16]}
    with pytest.raises(ExportError, match="bundle schema 2"):
        graph_input_names(ids, schema=2)

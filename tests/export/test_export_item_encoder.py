"""fair-export --item-encoder: the text encoder, tokenizer and per-level code tables a bundle ships so
the service can add items without retraining, and the numpy quantizer that gives them codes.

Parities: the ONNX encoder against sentence-transformers (cosine), the numpy quantizer against the
quantizers' own codes (rq-kmeans exact; RQ-VAE: the rate is measured), the per-level tables against
the fold of cold catalog items (export.fold, FAIR.id_vectors), and the whole service path (tokenizer,
ONNX, quantizer) against the semantic-ID table's codes on the catalog's own texts. The encoder is a
tiny random BERT built offline (tiny_item_encoder.py); the real MiniLM is measured by
bench/new_items_holdout.py (docs/benchmarks.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_export import build_tiny_run
from tiny_item_encoder import HIDDEN, ITEMS, LEVELS, VOCAB, build_item_encoder_run

from export.bundle import ITEM_ENCODER_FILES, load_bundle, verify_checksums
from export.cli import main as export_main
from export.fold import fold_item_scores
from export.item_encoder import new_item_parts
from export.onnx_export import item_input_table
from model.fair import FAIR, FAIRConfig
from model.semantic_ids.assign import next_collision_code, quantized_prefix
from model.semantic_ids.build import BuildConfig, build_table, fit_quantizer
from model.semantic_ids.collisions import CollisionError
from model.semantic_ids.rqkmeans import nearest
from model.semantic_ids.table import SemanticIdTable
from service.new_item_encoder import ItemEncoder, PrefixIndex, assign_codes


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    return build_item_encoder_run(tmp_path_factory.mktemp("item-encoder"), text=True)


@pytest.fixture(scope="module")
def encoder_bundle(encoder_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    argv = ["--run", str(encoder_run.run), "--data", str(encoder_run.data), "--out", str(root)]
    assert export_main([*argv, "--name", "tiny", "--item-encoder", "--users", "16"]) == 0
    return load_bundle(root / "tiny" / "1")


def _embeddings(n: int = 600, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_rqkmeans_codes_are_reproduced_exactly():
    x = _embeddings()
    codes, _, quantizer = fit_quantizer(
        x, BuildConfig(method="rqkmeans", levels=3, codebook_size=16), progress=False
    )
    ours = quantized_prefix(quantizer, "rqkmeans", x)
    assert np.array_equal(ours, codes)
    # and against rq-kmeans' own nearest-centroid (an implementation ours does not share)
    residual, books = x.copy(), quantizer["codebooks"]
    for level in range(3):
        assert np.array_equal(nearest(residual, books[level]), ours[:, level])
        residual -= books[level][ours[:, level]]


def test_rqvae_codes_are_reproduced_by_numpy():
    x = _embeddings(n=300, seed=1)
    cfg = BuildConfig(method="rqvae", levels=3, codebook_size=16, epochs=2)
    codes, _, quantizer = fit_quantizer(x, cfg, progress=False)
    ours = quantized_prefix(quantizer, "rqvae", x)
    agreement = np.mean(np.all(ours == codes, axis=1))
    print(f"RQ-VAE codes reproduced by numpy for {agreement:.2%} of {len(x)} items")
    assert agreement >= 0.99


def test_table_keeps_its_quantizer_and_hash(tmp_path):
    x = _embeddings(n=200)
    table = build_table(
        x,
        [f"i{i}" for i in range(200)],
        BuildConfig(method="rqkmeans", levels=2, codebook_size=16),
        progress=False,
    )
    assert set(table.quantizer) == {"codebooks"}
    back = SemanticIdTable.load(table.save(tmp_path / "t.npz"))
    assert np.array_equal(back.quantizer["codebooks"], table.quantizer["codebooks"])
    without = SemanticIdTable(table.item_ids, table.codes, table.codebook_size, table.meta)
    assert back.sha256() == without.sha256()  # the quantizer does not rename the codes
    old = SemanticIdTable.load(without.save(tmp_path / "old.npz"))  # a table without one still loads
    assert old.quantizer == {}


def test_next_collision_code_takes_the_smallest_free_and_refuses_a_full_prefix():
    codes = np.array([[1, 2, 0], [1, 2, 1], [1, 2, 3], [4, 4, 0]])
    assert next_collision_code(codes, np.array([1, 2]), 4) == 2
    assert next_collision_code(codes, np.array([9, 9]), 4) == 0
    full = np.array([[1, 2, c] for c in range(4)])
    with pytest.raises(CollisionError, match=r"prefix \[1, 2\].*4 items"):
        next_collision_code(full, np.array([1, 2]), 4)
    # new items in order: the first takes 2, the next the then-smallest free (4 does not exist: V=4)
    new, ok = assign_codes(np.array([[1, 2], [1, 2], [1, 2], [7, 7]]), PrefixIndex(codes, 4))
    assert ok.tolist() == [True, False, False, True]
    assert new[0].tolist() == [1, 2, 2] and new[3].tolist() == [7, 7, 0]
    with pytest.raises(CollisionError):
        assign_codes(np.array([[1, 2], [1, 2]]), PrefixIndex(codes, 4), strict=True)


@pytest.mark.parametrize("config", [{}, {"item_text": True, "text_dim": 12}, {"tie_output": False}])
def test_new_item_parts_give_the_rows_of_cold_catalog_items(config):
    torch.manual_seed(0)
    cfg = FAIRConfig(num_levels=3, codebook_size=8, d_model=16, n_layers=1, n_heads=2, num_items=40, **config)
    model = FAIR(cfg).eval()
    with torch.no_grad():
        model.head_bias.normal_()
        model.item_bias.normal_()
        if model.head_out is not None:
            model.head_out.normal_()
        model.item_trained[::3] = False
        if model.text_proj is not None:
            model.item_text.normal_()
    codes = np.random.default_rng(0).integers(0, 8, size=(40, 3))
    folded = fold_item_scores(model, codes)
    inputs = item_input_table(model)
    parts = new_item_parts(model)
    cold = np.flatnonzero(~model.item_trained.numpy())
    levels = np.arange(3)
    table = parts["code_table"][levels, codes[cold]].astype(np.float64).sum(1)
    if "text_out" in parts:
        table += model.item_text[cold].numpy().astype(np.float64) @ parts["text_out"]
    bias = parts["code_bias"][levels, codes[cold]].astype(np.float64).sum(1)
    np.testing.assert_allclose(table, folded.table[cold], atol=1e-5)
    np.testing.assert_allclose(bias, folded.bias[cold], atol=1e-5)
    expected_inputs = (
        np.zeros((len(cold), 16))
        if "text_in" not in parts
        else model.item_text[cold].numpy() @ parts["text_in"]
    )
    np.testing.assert_allclose(expected_inputs, inputs[cold], atol=1e-5)


def test_the_service_path_reproduces_the_table_and_the_fold(encoder_run, encoder_bundle):
    """What the bundle ships, read as the service reads it: the catalog's own texts get the table's
    codes, ONNX embeddings equal sentence-transformers', and a cold item's rows are the bundle's."""
    b = encoder_bundle
    record = b.manifest["item_encoder"]
    assert record["check"]["prefix_agreement"] == 1.0 and record["check"]["min_cosine"] > 0.9999
    assert set(ITEM_ENCODER_FILES) <= set(b.manifest["files"]) and not verify_checksums(b.dir)
    encoder = ItemEncoder.load(b)
    texts = encoder_run.dataset.item_texts()
    long_text = " ".join(texts[:8])  # past max_seq_length: truncated as sentence-transformers truncates
    ours = encoder.embed([*texts, long_text])
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(encoder_run.sentence), device="cpu").encode([*texts, long_text])
    cosine = (
        np.einsum("nd,nd->n", ours, reference)
        / np.linalg.norm(ours, axis=1)
        / np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() > 0.9999
    prefixes = encoder.prefixes(ours[:ITEMS])
    assert np.array_equal(prefixes, b.table.codes[:, :LEVELS])
    rows = encoder.rows(b.table.codes, ours[:ITEMS])
    cold = np.flatnonzero(~encoder_run.model.item_trained.numpy())
    np.testing.assert_allclose(rows.table[cold], b.scorer.table[cold], atol=1e-5)
    np.testing.assert_allclose(rows.bias[cold], b.scorer.bias[cold], atol=1e-5)
    np.testing.assert_allclose(rows.inputs[cold], b.item_inputs[cold], atol=1e-5)
    assert encoder.dim == HIDDEN and b.table.codebook_size == VOCAB


def test_item_encoder_needs_data_and_a_table_with_its_quantizer(encoder_run, tmp_path, capsys):
    root = tmp_path / "bundles"
    assert export_main(["--run", str(encoder_run.run), "--out", str(root), "--item-encoder"]) == 1
    assert "--item-encoder needs the run's data" in capsys.readouterr().err
    plain = build_tiny_run(tmp_path / "plain")  # random codes: no quantizer, no recorded encoder
    data = tmp_path / "plain-data"
    from tiny_export import write_tiny_data

    write_tiny_data(data, SemanticIdTable.load(plain / "semantic_ids.npz"))
    assert export_main(["--run", str(plain), "--data", str(data), "--out", str(root), "--item-encoder"]) == 1
    assert "holds no quantizer" in capsys.readouterr().err
    assert not root.exists() or not any(root.rglob("manifest.json"))  # nothing written


def test_inspect_reports_the_item_encoder(encoder_bundle, capsys):
    assert export_main(["inspect", str(encoder_bundle.dir)]) == 0
    out = capsys.readouterr().out
    assert "new items  encoder local:" in out and "rqkmeans" in out
    manifest = json.loads((encoder_bundle.dir / "manifest.json").read_text())
    assert manifest["item_encoder"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]

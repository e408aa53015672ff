"""fair-export --search ann: the faiss index is built at export, measured, shipped checksummed in the
bundle and served by the engine as offline; --search auto times the modes above its size limit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from export.bundle import ANN_INDEX_FILE, BundleError, load_bundle, verify_checksums
from export.cli import main
from export.search_choice import MIN_RECALL10, choose
from model.search.folded import CodeHeads, FoldedScorer
from model.search.modes.ann import AnnMode, default_nlist
from model.search.modes.exact import ExactMode
from model.semantic_ids.trie import CodeTrie
from service.engine import load_engine


@pytest.fixture(scope="module")
def ann_bundle(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "bundles"
    argv = ["--run", str(tiny_run), "--out", str(out), "--name", "a", "--search", "ann", "--candidates", "30"]
    assert main(argv) == 0
    return out / "a" / "1"


def test_an_ann_export_records_its_index_and_checksums_it(ann_bundle):
    bundle = load_bundle(ann_bundle)
    search = bundle.manifest["search"]
    nlist = default_nlist(bundle.table.num_items)
    assert {k: search[k] for k in ("mode", "candidates", "nprobe")} == {
        "mode": "ann",
        "candidates": 30,
        "nprobe": 96,
    }
    index = search["index"]
    assert {k: index[k] for k in ("type", "nlist", "dim", "metric", "nprobe")} == {
        "type": "IVF-Flat", "nlist": nlist, "dim": bundle.scorer.dim + 1, "metric": "inner_product", "nprobe": 96
    }  # fmt: skip
    assert index["build_seconds"] >= 0 and index["recall_users"] == 256
    assert index["recall10"] == 1.0  # nprobe 96 > nlist: every list probed, the exact ranking
    assert bundle.search == AnnMode(candidates=30, nprobe=96)
    assert len(bundle.manifest["files"][ANN_INDEX_FILE]) == 64
    checks = bundle.manifest["verification"]["fp32"]["checks"]
    assert "top-10 agreement through the served search (ann) against pytorch's item score" in checks


def test_an_ann_bundle_is_served_as_ranked_offline(ann_bundle):
    bundle = load_bundle(ann_bundle)
    engine = load_engine(ann_bundle, providers=["CPUExecutionProvider"])
    histories = [np.array([1, 2, 3]), np.array([4]), np.arange(0, 100, 2)]
    scores = engine.forward(histories)
    items, _ = engine.search(scores, beam_size=5, k=10, exclude=histories)
    want = ExactMode().search(bundle.scorer, bundle.trie, scores.outputs, 10, histories)
    np.testing.assert_array_equal(items, want.items)  # every list probed: exact's ranking
    partial = AnnMode(candidates=30, nprobe=1)  # one list: the engine's index is what ranks
    got = partial.search(engine.bundle.scorer, bundle.trie, scores.outputs, 10, histories)
    assert (got.items >= 0).all() and not any(
        np.isin(r, h).any() for r, h in zip(got.items, histories, strict=True)
    )


def test_a_tampered_or_unreadable_index_is_refused(ann_bundle, tmp_path):
    copy = tmp_path / "a" / "1"
    shutil.copytree(ann_bundle, copy)
    data = bytearray((copy / ANN_INDEX_FILE).read_bytes())
    data[-5] ^= 0xFF
    (copy / ANN_INDEX_FILE).write_bytes(bytes(data))
    assert any(p.startswith(f"{ANN_INDEX_FILE}: sha256") for p in verify_checksums(copy))
    with pytest.raises(BundleError, match=f"{ANN_INDEX_FILE}: sha256"):
        load_bundle(copy)
    (copy / ANN_INDEX_FILE).write_bytes(bytes(data[:100]))  # unverified: faiss itself must refuse it
    with pytest.raises(BundleError, match="not a readable faiss index"):
        load_bundle(copy, verify=False)
    (copy / ANN_INDEX_FILE).unlink()
    with pytest.raises(BundleError, match=f"{ANN_INDEX_FILE}: missing"):
        load_bundle(copy, verify=False)


def _folded(items: int, dim: int = 16, seed: int = 0) -> tuple[FoldedScorer, CodeTrie]:
    rng = np.random.default_rng(seed)
    codes = np.stack([np.arange(items) // 64, np.arange(items) % 64], axis=1).astype(np.int64)
    heads = CodeHeads(rng.normal(size=(dim, 2, 64)).astype(np.float32), np.zeros((2, 64), np.float32))
    table = rng.normal(size=(items, dim)).astype(np.float32)
    return FoldedScorer(codes, table, rng.normal(size=items).astype(np.float32), heads), CodeTrie.from_codes(
        codes, 64
    )


def test_auto_serves_the_fastest_search_that_keeps_the_exact_top_10():
    scorer, trie = _folded(3000)
    rng = np.random.default_rng(1)
    h = rng.normal(size=(64, 16)).astype(np.float32)
    histories = [rng.choice(3000, size=5, replace=False) for _ in range(64)]
    choice = choose(None, scorer, trie, h, histories, {"candidates": 100}, measure_above=0)
    rows = choice.entry["auto"]["measured"]
    assert [r["mode"] for r in rows][0] == "exact" and rows[-1]["mode"] == "beam"
    assert [r["nprobe"] for r in rows if r["mode"] == "ann"] == [16, 32, 64]  # the ladder up to nlist 76
    ok = [r for r in rows if r["recall10"] >= MIN_RECALL10]
    best = min(ok, key=lambda r: r["ms_per_user_b1"])
    assert choice.mode.describe() == choice.entry["auto"]["chosen"]
    assert choice.mode.name == best["mode"] and choice.mode.settings() == {
        k: best[k] for k in choice.mode.settings()
    }
    assert (choice.index is not None) == (choice.mode.name == "ann") == ("index" in choice.entry)
    small = choose(None, scorer, trie, h, histories, {}, measure_above=3000)
    assert small.mode == ExactMode() and "not measured" in small.entry["auto"]["why"]

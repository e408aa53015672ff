"""Bundle layout, versions, checksums and atomic writing (export.bundle, no export involved)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tiny_export import tiny_table

from export import bundle
from export.bundle import (
    BUNDLE_FILES,
    BundleError,
    BundleStaging,
    list_versions,
    load_bundle,
    resolve_bundle,
    save_folded,
    save_item_scores,
    save_trie,
    utc_now,
    verify_checksums,
    write_bundle,
)
from model.search.folded import CodeHeads, FoldedScorer
from model.search.inputs import CODE_INPUTS, ITEM_INDEX_INPUTS, ITEM_VECTOR_INPUTS
from model.search.scoring import ItemScorer
from model.semantic_ids.trie import CodeTrie


def _folded(table, dim: int = 4, items: int | None = None) -> FoldedScorer:
    n = table.num_items if items is None else items
    rng = np.random.default_rng(0)
    heads = CodeHeads(
        rng.standard_normal((dim, table.code_length, table.codebook_size)).astype(np.float32),
        rng.standard_normal((table.code_length, table.codebook_size)).astype(np.float32),
    )
    table_rows = rng.standard_normal((n, dim)).astype(np.float32)
    return FoldedScorer(table.codes[:n], table_rows, rng.standard_normal(n).astype(np.float32), heads)


def _folded_files(scorer: FoldedScorer, folder) -> dict:
    folder.mkdir(exist_ok=True)
    save_folded(scorer, folder)
    return {name: folder / name for name in ("item_table.npy", "item_bias.npy", "code_heads.npz")}


@pytest.fixture
def parts(tmp_path):
    """Files and manifest of a small valid bundle (model.onnx content is irrelevant here)."""
    table = tiny_table()
    table.save(tmp_path / "sid.npz")
    save_trie(CodeTrie.from_codes(table.codes, table.codebook_size), tmp_path / "trie.npz")
    np.save(tmp_path / "pop.npy", np.array([3, 1, 2], dtype=np.int64))
    files = {
        "model.onnx": b"not really onnx",
        "semantic_ids.npz": tmp_path / "sid.npz",
        **_folded_files(_folded(table), tmp_path / "folded"),
        "trie.npz": tmp_path / "trie.npz",
        "popular.npy": tmp_path / "pop.npy",
    }
    manifest = {
        "name": "m",
        "created": utc_now(),
        "precision": "fp32",
        "source": {},
        "model_config": {},
        "code_length": table.code_length,
        "codebook_size": table.codebook_size,
        "num_items": table.num_items,
        "max_history": 6,
        "sid_sha256": table.sha256(),
        "opset": 18,
        "inputs": [],
        "outputs": [],
        "search": {"mode": "exact", "candidates": 200},
        "metrics": {},
        "verification": {},
        "exporter": {"name": "test"},
    }
    return files, manifest, table


def test_versions_auto_increment_and_resolve_picks_newest_or_pinned(tmp_path, parts):
    files, manifest, _ = parts
    model_dir = tmp_path / "root" / "m"
    assert [write_bundle(model_dir, manifest, files).name for _ in range(3)] == ["1", "2", "3"]
    assert list_versions(model_dir) == [1, 2, 3]
    assert resolve_bundle(model_dir) == model_dir / "3"
    assert resolve_bundle(model_dir, version=2) == model_dir / "2"
    assert resolve_bundle(model_dir / "1") == model_dir / "1"
    assert json.loads((model_dir / "2" / "manifest.json").read_text())["version"] == 2
    with pytest.raises(BundleError, match="no version 7"):
        resolve_bundle(model_dir, version=7)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(model_dir, manifest, files, version=2)
    assert write_bundle(model_dir, manifest, files, version=10).name == "10"
    assert resolve_bundle(model_dir).name == "10"  # integer order, not string order


def test_load_bundle_reads_every_part(tmp_path, parts):
    files, manifest, table = parts
    loaded = load_bundle(write_bundle(tmp_path / "m", manifest, files))
    assert (loaded.name, loaded.version, loaded.precision, loaded.max_history) == ("m", 1, "fp32", 6)
    assert loaded.table.sha256() == table.sha256()
    assert loaded.trie.num_items == table.num_items
    assert loaded.popular.tolist() == [3, 1, 2]
    assert loaded.model_path.read_bytes() == b"not really onnx"
    assert verify_checksums(loaded.dir) == []


def test_checksums_catch_a_flipped_byte_a_missing_and_a_stray_file(tmp_path, parts):
    files, manifest, _ = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    data = bytearray((path / "trie.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "trie.npz").write_bytes(bytes(data))
    (path / "popular.npy").unlink()
    (path / "extra.bin").write_bytes(b"x")
    problems = verify_checksums(path)
    assert any(p.startswith("trie.npz: sha256") for p in problems)
    assert "popular.npy: missing" in problems
    assert any(p.startswith("extra.bin: present but not listed") for p in problems)
    with pytest.raises(BundleError, match="checksum check failed"):
        load_bundle(path)


def test_load_bundle_rejects_a_table_that_is_not_the_manifests(tmp_path, parts):
    files, manifest, _ = parts
    other = tiny_table(seed=5)
    other.save(tmp_path / "other.npz")
    path = write_bundle(tmp_path / "m", manifest, {**files, "semantic_ids.npz": tmp_path / "other.npz"})
    with pytest.raises(BundleError, match="sid_sha256"):
        load_bundle(path)


def test_a_failed_staging_leaves_nothing_behind(tmp_path, parts):
    files, manifest, _ = parts
    root = tmp_path / "root"
    with pytest.raises(RuntimeError, match="verification failed"), BundleStaging(root / "m") as staging:
        (staging.path / "model.onnx").write_bytes(b"half")
        raise RuntimeError("verification failed")
    assert not root.exists()  # created by the staging, removed with it
    with pytest.raises(BundleError, match="lacks file"):
        write_bundle(root / "m", manifest, {"model.onnx": b"x"})
    assert not root.exists()
    # an existing model directory survives, and keeps only its finished versions
    write_bundle(root / "m", manifest, files)
    with pytest.raises(BundleError), BundleStaging(root / "m") as staging:
        staging.commit({"name": "m"})  # incomplete: no files, no manifest fields
    assert sorted(p.name for p in (root / "m").iterdir()) == ["1"]
    assert sorted(p.name for p in (root / "m" / "1").iterdir()) == sorted([*BUNDLE_FILES, "manifest.json"])


def test_unwritable_output_is_a_bundle_error(tmp_path, parts):
    files, manifest, _ = parts
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(BundleError, match="cannot write a bundle here"):
        write_bundle(blocker / "m", manifest, files)


def test_resolve_rejects_a_directory_without_versions(tmp_path):
    (tmp_path / "m" / ".staging-x").mkdir(parents=True)  # in-flight staging dirs never count
    with pytest.raises(BundleError, match="neither a bundle"):
        resolve_bundle(tmp_path / "m")
    with pytest.raises(BundleError, match="no such bundle"):
        resolve_bundle(tmp_path / "nope")


def test_a_bundle_is_readable_by_other_users_as_a_plain_mkdir_would_be(tmp_path, parts):
    files, manifest, _ = parts
    old = os.umask(0o022)
    try:
        path = write_bundle(tmp_path / "m", manifest, files)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # not mkdtemp's 0700: the service may be another uid
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044 for p in path.iterdir())


def test_only_plain_integer_directories_are_versions(tmp_path, parts):
    files, manifest, _ = parts
    model_dir = tmp_path / "m"
    write_bundle(model_dir, manifest, files)
    for odd in ("²", "01", "0", "v2", "1.5"):
        (model_dir / odd).mkdir()
    assert list_versions(model_dir) == [1]
    assert resolve_bundle(model_dir) == model_dir / "1"


def test_concurrent_exports_never_share_a_version(tmp_path, parts, monkeypatch):
    files, manifest, _ = parts
    model_dir = tmp_path / "m"
    writers = 6
    gate = threading.Barrier(writers)
    real_next_version = bundle.next_version

    first_calls = itertools.count()

    def next_version_then_wait(path):  # every writer picks its first version before any renames
        v = real_next_version(path)
        if next(first_calls) < writers:
            gate.wait(timeout=10)
        return v

    monkeypatch.setattr(bundle, "next_version", next_version_then_wait)
    with ThreadPoolExecutor(writers) as pool:
        paths = list(pool.map(lambda _: write_bundle(model_dir, manifest, files), range(writers)))
    assert sorted(int(p.name) for p in paths) == list(range(1, writers + 1))
    for p in paths:
        assert json.loads((p / "manifest.json").read_text())["version"] == int(p.name)
        assert verify_checksums(p) == []
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(str(v) for v in range(1, writers + 1))


def test_a_schema_1_bundle_is_refused_with_a_message_to_re_export(tmp_path, parts):
    """Schema 1 bundles output per-level log-probs and carry no item_scores.npz: this version does not
    serve them, and says what to do instead of failing later on a missing output."""
    files, manifest, _ = parts
    path = write_bundle(tmp_path / "m", manifest, files)
    stored = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**stored, "schema_version": 1}))
    with pytest.raises(BundleError, match="schema 1 bundle .* re-export its checkpoint with fair-export"):
        load_bundle(path)


@pytest.mark.parametrize(
    "search", [{"mode": "greedy", "candidates": 10}, {"mode": "beam", "candidates": 0}, "exact"]
)
def test_a_manifest_with_a_bad_search_field_is_refused(tmp_path, parts, search):
    files, manifest, _ = parts
    path = write_bundle(tmp_path / "m", {**manifest, "search": search}, files)
    with pytest.raises(BundleError, match="field 'search'"):
        load_bundle(path, verify=False)


def test_a_folded_table_that_does_not_fit_the_catalog_is_refused(tmp_path, parts):
    files, manifest, table = parts
    n = table.num_items
    short = _folded_files(_folded(table, items=n - 1), tmp_path / "short")
    path = write_bundle(tmp_path / "m", manifest, {**files, **short})
    with pytest.raises(BundleError, match=f"item_table.npy: table .* do not fit {n} catalog items"):
        load_bundle(path)
    np.save(tmp_path / "wide.npy", np.zeros((n, 5), np.float32))  # 5 wide, the code heads are 4
    path = write_bundle(tmp_path / "m", manifest, {**files, "item_table.npy": tmp_path / "wide.npy"})
    with pytest.raises(BundleError, match=r"code_heads.npz: weight \(4, 3, 16\)"):
        load_bundle(path)
    np.save(tmp_path / "f64.npy", np.zeros(n, np.float64))
    path = write_bundle(tmp_path / "m", manifest, {**files, "item_bias.npy": tmp_path / "f64.npy"})
    with pytest.raises(BundleError, match="item_bias.npy: must hold finite float32"):
        load_bundle(path)


def test_a_bundle_loads_its_folded_item_score(tmp_path, parts):
    files, manifest, table = parts
    loaded = load_bundle(write_bundle(tmp_path / "m", manifest, files))
    want = _folded(table)
    assert loaded.schema_version == 4 and loaded.output_names == ("history",)
    assert loaded.input_names == CODE_INPUTS and loaded.item_inputs is None  # no item_inputs input
    np.testing.assert_array_equal(loaded.scorer.table, want.table)
    np.testing.assert_array_equal(loaded.scorer.heads.weight, want.heads.weight)
    h = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(loaded.scorer.all_scores(h), h @ want.table.T + want.bias, rtol=1e-6)


def test_a_schema_2_bundle_is_still_read_and_scored_unfolded(tmp_path, parts):
    """Bundles exported before the fold (graph -> code_scores + query, item_scores.npz) keep serving."""
    files, manifest, table = parts
    n = table.num_items
    scorer = ItemScorer(table.codes, np.ones((n, 4), np.float32), np.zeros(n, np.float32))
    save_item_scores(scorer, np.ones(n, dtype=bool), tmp_path / "scores.npz")
    old = {k: v for k, v in files.items() if k not in ("item_table.npy", "item_bias.npy", "code_heads.npz")}
    old["item_scores.npz"] = tmp_path / "scores.npz"
    path = write_bundle(tmp_path / "m", {**manifest, "schema_version": 2}, old)
    loaded = load_bundle(path)
    assert loaded.schema_version == 2 and loaded.output_names == ("code_scores", "query")
    assert isinstance(loaded.scorer, ItemScorer) and (loaded.scorer.vectors == 1).all()
    assert verify_checksums(path) == []
    short = ItemScorer(table.codes[:-1], np.ones((n - 1, 4), np.float32), np.zeros(n - 1, np.float32))
    save_item_scores(short, np.ones(n - 1, dtype=bool), tmp_path / "short.npz")
    bad = write_bundle(
        tmp_path / "m", {**manifest, "schema_version": 2}, {**old, "item_scores.npz": tmp_path / "short.npz"}
    )
    with pytest.raises(BundleError, match=f"do not fit {n} catalog items"):
        load_bundle(bad)
    with pytest.raises(BundleError, match="lacks file"):  # a schema 3 bundle needs the folded table
        write_bundle(tmp_path / "m", manifest, old)


ITEM_INPUTS_SPEC = {"name": "item_inputs", "dtype": "float32", "shape": ["batch", "items", 4]}


def test_a_schema_4_graph_with_item_inputs_ships_and_loads_its_item_input_table(tmp_path, parts):
    """The graph input item_inputs makes item_inputs.npy part of the bundle: listed, checksummed and
    read against the catalog and the graph's width like item_table.npy."""
    files, manifest, table = parts
    n = table.num_items
    manifest = {**manifest, "inputs": [{"name": "codes"}, ITEM_INPUTS_SPEC, {"name": "item_mask"}]}
    with pytest.raises(BundleError, match="lacks file.*item_inputs.npy"):
        write_bundle(tmp_path / "m", manifest, files)
    rows = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", rows)
    path = write_bundle(tmp_path / "m", manifest, {**files, "item_inputs.npy": tmp_path / "inputs.npy"})
    loaded = load_bundle(path)
    assert loaded.schema_version == 4 and loaded.input_names == ITEM_VECTOR_INPUTS
    np.testing.assert_array_equal(loaded.item_inputs, rows)
    assert "item_inputs.npy" in loaded.manifest["files"] and verify_checksums(path) == []
    (path / "item_inputs.npy").unlink()
    assert "item_inputs.npy: missing" in verify_checksums(path)
    for bad, message in [
        (rows[:-1], f"item inputs \\({n - 1}, 4\\) do not fit {n} catalog items"),
        (np.zeros((n, 5), np.float32), "item inputs are 5 wide, the graph's item_inputs 4"),
        (rows.astype(np.float64), "must hold finite float32"),
        (np.full((n, 4), np.nan, np.float32), "must hold finite float32"),
    ]:
        np.save(tmp_path / "bad.npy", bad)
        path = write_bundle(tmp_path / "m", manifest, {**files, "item_inputs.npy": tmp_path / "bad.npy"})
        with pytest.raises(BundleError, match=f"item_inputs.npy: {message}"):
            load_bundle(path)


def test_a_schema_3_bundle_is_still_read_with_its_item_index_graph(tmp_path, parts):
    """Bundles exported before schema 4 (the graph takes item indices, no item_inputs.npy) keep loading;
    their graph is fed the item indices."""
    files, manifest, _ = parts
    items = [{"name": "codes"}, {"name": "items"}, {"name": "item_mask"}]
    loaded = load_bundle(
        write_bundle(tmp_path / "m", {**manifest, "schema_version": 3, "inputs": items}, files)
    )
    assert loaded.schema_version == 3 and loaded.input_names == ITEM_INDEX_INPUTS
    assert loaded.item_inputs is None and loaded.output_names == ("history",)


def test_a_bundle_whose_directory_names_another_version_is_refused(tmp_path, parts):
    """`cp -a demo/1 demo/3` used to be served as version 1 from .../3 (and reloaded by the poller forever)."""
    files, manifest, _ = parts
    model_dir = tmp_path / "m"
    first = write_bundle(model_dir, manifest, files)
    shutil.copytree(first, model_dir / "3")
    with pytest.raises(BundleError, match="manifest is version 1 but the bundle directory is 3"):
        load_bundle(model_dir / "3")
    with pytest.raises(BundleError, match="manifest is version 1 but the bundle directory is 3"):
        verify_checksums(model_dir / "3")
    assert load_bundle(first).version == 1


@pytest.mark.parametrize(
    "popular, message",
    [
        (np.zeros(0, np.int64), "non-empty 1-d integer array"),
        (np.array([[1, 2]]), "non-empty 1-d integer array"),
        (np.array([0.5, 1.0]), "non-empty 1-d integer array"),
        (np.array([1, 10**6]), r"must lie in \[0, "),
    ],
)
def test_a_bundle_whose_fallback_list_is_empty_or_malformed_is_refused(tmp_path, parts, popular, message):
    """The fallback serves users without history from popular.npy: an empty list would answer them
    with nothing, so a bundle reader refuses it like fair-export does (one reader, one rule)."""
    files, manifest, _ = parts
    np.save(tmp_path / "bad.npy", popular)
    path = write_bundle(tmp_path / "m", manifest, {**files, "popular.npy": tmp_path / "bad.npy"})
    with pytest.raises(BundleError, match=f"popular.npy: .*{message}"):
        load_bundle(path)

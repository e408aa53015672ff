import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from model.semantic_ids.cli import main
from model.semantic_ids.table import FORMAT_VERSION, SemanticIdError, SemanticIdTable

NUM_ITEMS = 60


@pytest.fixture
def data_dir(tmp_path):
    """A tiny dataset in the benchmark format (<Name>.txt.gz + items.tsv.gz) and clustered embeddings."""
    d = tmp_path / "Tiny"
    d.mkdir()
    item_ids = [f"i{k}" for k in range(NUM_ITEMS)]
    with gzip.open(d / "items.tsv.gz", "wt") as f:
        f.write("item_id\ttitle\n")
        for k, iid in enumerate(item_ids):
            f.write(f"{iid}\tproduct {k} of shelf {k % 6}\n")
    rng = np.random.default_rng(0)
    with gzip.open(d / "Tiny.txt.gz", "wt") as f:
        for u in range(30):
            f.write(f"u{u} " + " ".join(rng.choice(item_ids, size=5, replace=False)) + "\n")
    centres = rng.normal(size=(6, 12)) * 3
    emb = centres[np.arange(NUM_ITEMS) % 6] + 0.2 * rng.normal(size=(NUM_ITEMS, 12))
    np.save(tmp_path / "emb.npy", emb.astype(np.float32))
    return d, tmp_path / "emb.npy", item_ids


def _stats(path, capsys):
    capsys.readouterr()
    assert main(["stats", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_build_then_stats_gives_unique_ids(data_dir, tmp_path, capsys, method):
    d, emb, item_ids = data_dir
    out = tmp_path / "sid" / f"{method}.npz"
    argv = ["build", "--data", str(d), "--out", str(out), "--method", method, "--levels", "2"]
    size = 8 if method == "rqkmeans" else 16
    argv += [
        "--codebook-size",
        str(size),
        "--embeddings",
        str(emb),
        "--epochs",
        "30",
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    stats = _stats(out, capsys)
    assert set(stats) == {
        "items",
        "unique_ids",
        "code_length",
        "codebook_size",
        "utilization",
        "collisions",
        "max_collision_group",
    }
    assert stats["items"] == stats["unique_ids"] == NUM_ITEMS
    assert stats["code_length"] == 3 and stats["codebook_size"] == size
    assert len(stats["utilization"]) == 3 and all(0 < u <= 1 for u in stats["utilization"])
    assert stats["max_collision_group"] >= 1
    table = SemanticIdTable.load(out)
    table.check_catalog(item_ids)
    assert table.meta["method"] == method and table.meta["levels"] == 2
    assert {"embed", "quantize", "collisions"} <= set(table.meta["seconds"])
    assert table.meta["collisions"] == stats["collisions"]
    with pytest.raises(SemanticIdError, match="table items are not in the dataset"):
        table.check_catalog(item_ids[:-1] + ["new item"])


def test_embedding_row_mismatch_fails_cleanly(data_dir, tmp_path, capsys):
    d, _, _ = data_dir
    np.save(tmp_path / "short.npy", np.ones((NUM_ITEMS - 1, 4), dtype=np.float32))
    out = tmp_path / "t.npz"
    argv = [
        "build",
        "--data",
        str(d),
        "--out",
        str(out),
        "--embeddings",
        str(tmp_path / "short.npy"),
        "--quiet",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "short.npy" in err and f"{NUM_ITEMS - 1} rows but the catalog has {NUM_ITEMS} items" in err
    assert not out.exists()


def test_too_small_codebook_for_collisions_fails_cleanly(data_dir, tmp_path, capsys):
    d, emb, _ = data_dir
    out = tmp_path / "t.npz"
    argv = ["build", "--data", str(d), "--out", str(out), "--method", "rqkmeans", "--levels", "1"]
    argv += ["--codebook-size", "4", "--embeddings", str(emb), "--quiet"]
    assert main(argv) == 1
    assert "share the code tuple" in capsys.readouterr().err
    assert not out.exists()


def test_stats_refuses_other_versions_and_missing_files(tmp_path, capsys):
    path = tmp_path / "future.npz"
    SemanticIdTable(item_ids=["a"], codes=np.zeros((1, 2)), codebook_size=4).save(path)
    with np.load(path) as z:
        arrays = dict(z)
    arrays["format_version"] = np.int64(FORMAT_VERSION + 1)
    np.savez(path, **arrays)
    assert main(["stats", str(path), "--json"]) == 1
    assert f"format version {FORMAT_VERSION + 1}" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "nope.npz")]) == 1
    assert "no such semantic-ID table" in capsys.readouterr().err


def test_stats_text_output(tmp_path, capsys):
    path = tmp_path / "t.npz"
    SemanticIdTable(item_ids=["a", "b"], codes=[[1, 0], [1, 1]], codebook_size=4).save(path)
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert "items               2" in out and "collisions          2 items (largest group 2)" in out


def test_stats_does_not_need_torch():
    """``fair-sid stats`` must work (and start fast) where only the serving dependencies exist."""
    code = "import sys; import model.semantic_ids.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

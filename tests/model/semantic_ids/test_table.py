"""SemanticIdTable: save/load round trip, version and catalog checks."""

import numpy as np
import pytest

from model.semantic_ids.table import SemanticIdError, SemanticIdTable


def make_table() -> SemanticIdTable:
    codes = np.array([[1, 2, 3, 0], [1, 2, 3, 1], [4, 5, 6, 0]])
    return SemanticIdTable(item_ids=["i1", "i2", "i3"], codes=codes, codebook_size=8, meta={"method": "test"})


def test_round_trip(tmp_path):
    table = make_table()
    path = table.save(tmp_path / "sub" / "sid.npz")
    loaded = SemanticIdTable.load(path)
    assert loaded.item_ids == table.item_ids
    np.testing.assert_array_equal(loaded.codes, table.codes)
    assert loaded.codebook_size == 8 and loaded.meta == {"method": "test"}
    assert loaded.sha256() == table.sha256()
    assert loaded.index_of()["i3"] == 2
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_codes_out_of_range_rejected():
    with pytest.raises(SemanticIdError, match=r"codes must lie in \[0, 4\)"):
        SemanticIdTable(item_ids=["a"], codes=np.array([[4, 0]]), codebook_size=4)


def test_catalog_mismatch_is_explained():
    table = make_table()
    table.check_catalog(["i1", "i2", "i3"])
    with pytest.raises(SemanticIdError, match="1 dataset items have no semantic ID"):
        table.check_catalog(["i1", "i2", "i3", "i4"])
    with pytest.raises(SemanticIdError, match="another order"):
        table.check_catalog(["i3", "i2", "i1"])


def test_version_and_corruption_errors(tmp_path):
    path = make_table().save(tmp_path / "sid.npz")
    with np.load(path) as z:
        data = dict(z)
    data["format_version"] = np.int64(99)
    bad = tmp_path / "v99.npz"
    np.savez(bad, **data)
    with pytest.raises(SemanticIdError, match="format version 99"):
        SemanticIdTable.load(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(SemanticIdError, match="not a readable semantic-ID table"):
        SemanticIdTable.load(junk)
    with pytest.raises(SemanticIdError, match="no such"):
        SemanticIdTable.load(tmp_path / "missing.npz")

"""fair-sid expand: an expanded catalog's table = the source's tuple ++ the variant in base V."""

from __future__ import annotations

import numpy as np
import pytest

from model.data.benchmark import write_benchmark
from model.data.cli import main as data_main
from model.data.dataset import SequenceDataset
from model.data.loading import load_dataset
from model.semantic_ids.cli import main as sid_main
from model.semantic_ids.expand import expand_semantic_ids, variant_digits
from model.semantic_ids.table import SemanticIdError, SemanticIdTable


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 12-item source dataset and a semantic-ID table for it with a real collision (items 0 and 1 share
    their quantized levels, told apart by the last code)."""
    rng = np.random.default_rng(3)
    n_items = 12
    dataset = SequenceDataset(
        name="Mini",
        item_ids=[f"it{i}" for i in range(n_items)],
        item_fields={"title": [f"product {i}" for i in range(n_items)]},
        user_ids=[f"U{u}" for u in range(10)],
        sequences=[rng.choice(n_items, size=5, replace=False).astype(np.int64) for _ in range(10)],
    )
    root = tmp_path_factory.mktemp("sidexp")
    write_benchmark(dataset, root / "Mini")
    codes = np.array([[1, i % 5, i, 0] for i in range(n_items)], dtype=np.int64)
    codes[1] = [1, 0, 0, 1]  # item 1 = item 0's quantized levels, collision code 1
    table = SemanticIdTable(
        item_ids=dataset.item_ids, codes=codes, codebook_size=16, meta={"method": "rqvae"}
    )
    table.save(root / "mini_sid.npz")
    return root


def test_variant_digits_grow_with_the_copies():
    assert variant_digits(0, 256) == 1
    assert variant_digits(255, 256) == 1
    assert variant_digits(256, 256) == 2
    assert variant_digits(65_536, 256) == 3
    with pytest.raises(SemanticIdError, match=">= 2"):
        variant_digits(3, 1)


def test_cli_expands_a_fair_data_expand_catalog(source, capsys):
    big = source / "big"
    assert data_main(["expand", "--data", str(source / "Mini"), "--out", str(big), "--items", "200"]) == 0
    out = source / "big_sid.npz"
    assert (
        sid_main(["expand", "--data", str(big), "--source", str(source / "mini_sid.npz"), "--out", str(out)])
        == 0
    )
    assert "code length 6 (4 from" in capsys.readouterr().out  # 17 copies > V=16: two variant digits
    table = SemanticIdTable.load(out)
    src = SemanticIdTable.load(source / "mini_sid.npz")
    data = load_dataset(big)
    table.check_catalog(data.item_ids)  # usable with the expanded dataset as is
    assert len({tuple(c) for c in table.codes}) == table.num_items  # unique tuples
    source_of = data.item_meta["source_item_id"]
    variant = [int(v) for v in data.item_fields["variant"]]
    for k in range(table.num_items):
        assert list(table.codes[k, :4]) == list(src.codes[src.index_of()[source_of[k]]])
        assert table.codes[k, 4] * 16 + table.codes[k, 5] == variant[k]


def test_cli_refuses_a_catalog_that_is_not_expanded(source, capsys):
    rc = sid_main(
        [
            "expand",
            "--data",
            str(source / "Mini"),
            "--source",
            str(source / "mini_sid.npz"),
            "--out",
            str(source / "x.npz"),
        ]
    )
    assert rc == 1
    assert "not a `fair-data expand` catalog" in capsys.readouterr().err


def test_unknown_source_and_duplicate_variants_are_errors(source):
    src = SemanticIdTable.load(source / "mini_sid.npz")
    with pytest.raises(SemanticIdError, match="'nope' is not in the source"):
        expand_semantic_ids(src, ["a"], ["nope"], [0])
    with pytest.raises(SemanticIdError, match="same variant of the same source"):
        expand_semantic_ids(src, ["a", "b"], ["it0", "it0"], [3, 3])
    with pytest.raises(SemanticIdError, match=">= 0"):
        expand_semantic_ids(src, ["a"], ["it0"], [-1])
